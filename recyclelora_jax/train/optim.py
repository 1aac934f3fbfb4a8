"""Parameter groups, schedules and the AdamW optimizer of RECIPE.md §5, through ``optax.partition``.

Groups come from regex rules over '/'-joined parameter paths of the full tree
``{"backbone": ..., "head": ...}`` (first matching rule wins; every leaf must be covered).
Frozen leaves are split off before differentiation and get no optimizer state at all.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from recyclelora_jax.config import FROZEN
from recyclelora_jax.recipe import ParamGroup

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """RECIPE.md §5 defaults: AdamW, poly LR (power 0.9) to 0, cosine-annealed weight decay."""

    lr: float = 1e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.05
    wd_eta_min: float = 1e-5
    total_steps: int = 40_000
    lr_power: float = 0.9
    warmup_steps: int = 0


def optim_config(cfg: ml_collections.ConfigDict) -> OptimConfig:
    """``cfg.optim`` and the run length as the optimizer's settings."""
    o = cfg.optim
    return OptimConfig(
        lr=o.lr,
        b1=o.b1,
        b2=o.b2,
        eps=o.eps,
        weight_decay=o.weight_decay,
        wd_eta_min=o.weight_decay_min,
        total_steps=cfg.train.steps,
        lr_power=o.power,
        warmup_steps=o.warmup_steps,
    )


def poly_lr(cfg: OptimConfig, mult: float = 1.0) -> optax.Schedule:
    """``lr·mult·(1 - t/T)^power`` after an optional linear warmup, held at 0 from ``T`` on.

    ``1 - t/T`` is formed as the integer ``T - t`` over ``T``: float32 ``t/T`` loses most digits
    of the last steps (at t = T - 1 it would be off by 0.1 %)."""
    peak, warmup = cfg.lr * mult, cfg.warmup_steps
    decay_steps = cfg.total_steps - warmup
    if decay_steps <= 0:
        raise ValueError(f"total_steps {cfg.total_steps} must exceed warmup {warmup}")

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.int32)
        left = jnp.clip(cfg.total_steps - step, 0, decay_steps).astype(jnp.float32)
        value = peak * (left / decay_steps) ** cfg.lr_power
        if warmup:
            value = jnp.where(step < warmup, peak * step.astype(jnp.float32) / warmup, value)
        return value

    return schedule


def cosine_wd(cfg: OptimConfig, start: float) -> optax.Schedule:
    """mmengine ``CosineAnnealingParamScheduler`` in closed form, held at ``eta_min`` after T:
    ``eta_min + (start - eta_min)(1 + cos(pi t / T)) / 2``, evaluated as
    ``start·cos²(x/2) + eta_min·sin²(x/2)`` so float32 keeps the tiny first steps of a group
    that starts at 0."""
    eta, total = cfg.wd_eta_min, cfg.total_steps

    def schedule(step: jax.Array) -> jax.Array:
        half = jnp.minimum(step, total).astype(jnp.float32) * (math.pi / (2 * total))
        return start * jnp.cos(half) ** 2 + eta * jnp.sin(half) ** 2

    return schedule


def group_transform(cfg: OptimConfig, group: ParamGroup) -> optax.GradientTransformation:
    """torch-style AdamW for one group: the decay ``lr·wd·p`` is decoupled from the Adam
    direction and scaled by the group's (scheduled) learning rate."""
    start = cfg.weight_decay if group.weight_decay else 0.0
    return optax.chain(
        optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps),
        optax.add_decayed_weights(cosine_wd(cfg, start)),
        optax.scale_by_learning_rate(poly_lr(cfg, group.lr_mult)),
    )


def make_optimizer(
    cfg: OptimConfig, groups: Sequence[ParamGroup], trainable_labels: Params
) -> optax.GradientTransformation:
    """``optax.partition`` over the trainable subtree's labels (``split_trainable``'s first
    output), so frozen leaves never reach the optimizer."""
    used = set(jax.tree.leaves(trainable_labels))
    if FROZEN in used:
        raise ValueError("make_optimizer takes the trainable labels only; split_trainable first")
    defined = {g.name: g for g in groups}
    missing = sorted(used - defined.keys())
    if missing:
        raise ValueError(f"labels use groups {missing} that are not defined: {sorted(defined)}")
    transforms = {name: group_transform(cfg, defined[name]) for name in used}
    return optax.partition(transforms, trainable_labels)


def ema_update(
    ema: Params, params: Params, step: jax.Array | int, momentum: float, begin_step: int
) -> Params:
    """mmengine ``ExponentialMovingAverage`` with ``begin_iter``: copy before ``begin_step``,
    then ``ema += momentum·(params - ema)`` (SoMA: momentum 2e-4 from iteration 12,000)."""
    started = jnp.asarray(step) >= begin_step
    return jax.tree.map(
        lambda e, p: jnp.where(started, e + momentum * (p - e), p).astype(e.dtype), ema, params
    )


def param_overview(params: Params, labels: Params) -> str:
    """A printable table: leaves, parameter count and bytes per group, trainable total."""
    flat_labels = traverse_util.flatten_dict(labels, sep="/")
    rows: dict[str, list[int]] = {}
    for path, leaf in traverse_util.flatten_dict(params, sep="/").items():
        row = rows.setdefault(flat_labels[path], [0, 0, 0])
        size = int(np.prod(leaf.shape))
        row[0] += 1
        row[1] += size
        row[2] += size * np.dtype(leaf.dtype).itemsize
    lines = [f"{'group':<20}{'leaves':>8}{'params':>16}{'MiB':>12}"]
    for name in sorted(rows):
        n, count, nbytes = rows[name]
        lines.append(f"{name:<20}{n:>8}{count:>16,}{nbytes / 2**20:>12.2f}")
    trainable = sum(r[1] for name, r in rows.items() if name != FROZEN)
    total = sum(r[1] for r in rows.values())
    lines.append(f"trainable {trainable:,} of {total:,} parameters")
    return "\n".join(lines)
