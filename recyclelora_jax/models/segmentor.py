"""Backbone + segmentation head as one linen module, and the head factory used by configs."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from recyclelora_jax.models.linear_head import LinearHead
from recyclelora_jax.models.mask2former import Mask2FormerHead

HEADS: dict[str, type[nn.Module]] = {"mask2former": Mask2FormerHead, "linear": LinearHead}


def build_head(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """The head called ``name`` ("mask2former" or "linear") with its keyword hyper-parameters."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; choose one of {sorted(HEADS)}")
    return HEADS[name](num_classes=num_classes, **kwargs)


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
