"""DINOv2's linear segmentation probe without BatchNorm (no batch_stats to carry around)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from recyclelora_jax.models.resize import resize_bilinear


class LinearHead(nn.Module):
    """Resize every map to the first one's size, concatenate, LayerNorm, 1x1 conv.

    DINOv2's ``BNHead`` normalises the concatenation with (Sync)BatchNorm; a per-pixel
    LayerNorm plays that role here without batch statistics. Returns ``logits`` (B, h, w, K)
    at feature resolution; the loss and ``scores`` upsample them.
    """

    num_classes: int = 19

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], train: bool = False) -> dict[str, jax.Array]:
        del train
        size = features[0].shape[1:3]
        x = jnp.concatenate([resize_bilinear(f, size) for f in features], -1)
        x = nn.LayerNorm(1e-5, name="norm")(x)
        return {"logits": nn.Conv(self.num_classes, (1, 1), name="conv_seg")(x)}

    def scores(self, outputs: dict[str, jax.Array], size: tuple[int, int]) -> jax.Array:
        """Per-pixel class scores (B, H, W, K): the logits resized to ``size``."""
        return resize_bilinear(outputs["logits"], size)
