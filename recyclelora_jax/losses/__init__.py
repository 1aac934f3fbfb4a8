"""Segmentation losses: Mask2Former set loss (Hungarian matching) and per-pixel cross-entropy;
which head trains with which is ``heads.HEADS``."""

from recyclelora_jax.losses.mask2former_loss import (
    LossConfig,
    mask2former_loss,
    pixel_cross_entropy,
    set_loss_terms,
)
from recyclelora_jax.losses.matching import hungarian_match

__all__ = [
    "LossConfig",
    "hungarian_match",
    "mask2former_loss",
    "pixel_cross_entropy",
    "set_loss_terms",
]
