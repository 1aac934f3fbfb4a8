"""The segmentation heads by name, each with the loss it trains with: the head owns its loss
(scenic's models do the same), so nothing downstream dispatches on a head's output keys."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from recyclelora_jax.losses import LossConfig, mask2former_loss, pixel_cross_entropy
from recyclelora_jax.models.linear_head import LinearHead
from recyclelora_jax.models.mask2former import Mask2FormerHead

Outputs = dict[str, jax.Array]
# (head outputs, (B, H, W) labels, rng, settings) -> (scalar loss, named weighted terms)
LossFn = Callable[[Outputs, jax.Array, jax.Array, LossConfig], tuple[jax.Array, Outputs]]


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """A head: its linen module (``num_classes`` plus keyword hyper-parameters) and its loss."""

    module: type[nn.Module]
    loss: LossFn


def linear_head_loss(
    outputs: Outputs, labels: jax.Array, rng: jax.Array, cfg: LossConfig
) -> tuple[jax.Array, Outputs]:
    """The linear head's pixel cross-entropy (nothing sampled: ``rng`` is unused)."""
    del rng
    return pixel_cross_entropy(outputs["logits"], labels, cfg.ignore_index)


HEADS: dict[str, HeadSpec] = {
    "mask2former": HeadSpec(Mask2FormerHead, mask2former_loss),
    "linear": HeadSpec(LinearHead, linear_head_loss),
}


def head_spec(name: str) -> HeadSpec:
    if name not in HEADS:
        raise ValueError(f"model.head.name={name!r} unknown; choose one of {sorted(HEADS)}")
    return HEADS[name]


def build_head(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """The head called ``name`` with its keyword hyper-parameters."""
    return head_spec(name).module(num_classes=num_classes, **kwargs)
