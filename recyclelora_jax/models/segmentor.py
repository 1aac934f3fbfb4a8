"""Backbone + segmentation head as one linen module (the heads by name: ``heads.HEADS``)."""

from __future__ import annotations

import flax.linen as nn
import jax


class Segmentor(nn.Module):
    """``params = {"backbone": ..., "head": ...}``.

    ``__call__`` returns the head's training outputs (see the head); ``predict`` returns
    per-pixel class scores (B, H, W, K) at the input size, via
    ``model.apply(variables, images, method=Segmentor.predict)``.
    """

    backbone: nn.Module
    head: nn.Module

    def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        features = self.backbone(images)["features"]
        return self.head(features, train=train)

    def predict(self, images: jax.Array) -> jax.Array:
        return self.head.scores(self(images), images.shape[1:3])
