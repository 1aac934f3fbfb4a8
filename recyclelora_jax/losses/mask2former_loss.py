"""Mask2Former's set loss (mmdet recipe, RECIPE.md §4) with static shapes, plus pixel cross-entropy.

Targets are never materialised as (B, K, H, W) float masks: a semantic target "class k" sampled
at a point is the bilinear weight of the corners whose label is k, which is exactly
``grid_sample`` of the binary mask ``labels == k``; the corners' classes are read as one int8 code
per point (``corner_classes``). Every image has K target slots (one per class) and a validity
mask, so the loss jits, vmaps over the batch and shards with it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from recyclelora_jax.classes import IGNORE, NUM_CLASSES
from recyclelora_jax.losses.matching import hungarian_match
from recyclelora_jax.models import loops
from recyclelora_jax.models.resize import resize_bilinear
from recyclelora_jax.models.sampling import (
    bilinear_corners,
    cell_origin,
    resolve_sampling,
    sample_points,
    sample_points_matmul,
)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights and point sampling of the reference recipe (mmdet ``Mask2FormerHead``)."""

    num_classes: int = NUM_CLASSES
    ignore_index: int = IGNORE
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    # point sampling of the mask logits: gather, matmul (the TPU forms: interpolation-weight
    # matmuls, uncertain points chosen by a sort), auto (by backend)
    sampling: str = "auto"

    @property
    def num_uncertain(self) -> int:
        return int(self.importance_sample_ratio * self.num_points)

    @property
    def num_oversampled(self) -> int:
        return int(self.num_points * self.oversample_ratio)


def check_labels(labels: jax.Array) -> None:
    if labels.ndim != 3:
        raise ValueError(f"labels must be (B, H, W), got shape {labels.shape}")


def present_classes(labels: jax.Array, num_classes: int) -> jax.Array:
    """(B, H, W) int labels -> (B, K) bool: which classes occur (ignore/other ids excluded).

    A compare-and-reduce per class, not a ``bincount``: on TPU the bincount's scatter-add
    gave the compiler's cost model a negative time estimate (and so the whole step none) and
    8 GiB of counted traffic for 16 label maps (docs/BENCHMARKS.md)."""
    lab = jnp.clip(labels.reshape(labels.shape[0], 1, -1).astype(jnp.int32), 0, num_classes)
    return (lab == jnp.arange(num_classes)[None, :, None]).any(-1)


def corner_classes(labels: jax.Array, num_classes: int) -> jax.Array:
    """(B, H, W) labels -> (B, K, H + 1, W + 1) int8 codes of the bilinear cells: entry
    (k, y + 1, x + 1) has bit c set where corner c (``bilinear_corners``' order) of the cell
    whose top-left pixel is (y, x) has class k; pixels outside the map have no class.

    Built once per batch for every set, so ``label_points`` reads one int8 per point instead of
    four int32 labels: on TPU the compiler counts each gathered element at about a tile, and the
    four-label gather was 20.5 of the recipe's 31 GiB per set (docs/BENCHMARKS.md)."""
    h, w = labels.shape[1:]
    hit = labels[:, None] == jnp.arange(num_classes)[None, :, None, None]
    hit = jnp.pad(hit, ((0, 0), (0, 0), (1, 1), (1, 1)))
    return sum(
        hit[:, :, dy : dy + h + 1, dx : dx + w + 1].astype(jnp.int8) << (2 * dy + dx)
        for dy in (0, 1)
        for dx in (0, 1)
    )


def label_points(codes: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    """``grid_sample`` of the binary masks ``label == k`` of one image at points (x, y), from its
    ``corner_classes`` codes (K, H + 1, W + 1) -> (K, P) float32: points (K, P) are each class's
    own, points (P,) are shared by all classes."""
    k, h, w = codes.shape[0], codes.shape[1] - 1, codes.shape[2] - 1
    x0, y0 = cell_origin(x, y, h, w)
    # A cell clipped here has all four corners outside the map: weight 0 whatever it reads.
    cell = (jnp.clip(y0, -1, h - 1) + 1) * (w + 1) + jnp.clip(x0, -1, w - 1) + 1
    cell, codes = cell.astype(jnp.int32), codes.reshape(k, -1)
    code = codes[:, cell] if cell.ndim == 1 else jnp.take_along_axis(codes, cell, axis=-1)
    _, wts = bilinear_corners(x, y, h, w)
    return sum(wts[c] * ((code >> c) & 1) for c in range(4))


def _bce(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return targets * jax.nn.softplus(-logits) + (1.0 - targets) * jax.nn.softplus(logits)


def _dice(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1) over the last axis (naive dice, eps 1)."""
    p = jax.nn.sigmoid(logits)
    return 1.0 - (2.0 * (p * targets).sum(-1) + 1.0) / (p.sum(-1) + targets.sum(-1) + 1.0)


def _sample(maps: jax.Array, x: jax.Array, y: jax.Array, sampling: str) -> jax.Array:
    """(N, h, w) maps at per-map points (N, P) -> (N, P) float32, by ``sampling``."""
    if resolve_sampling(sampling, jax.default_backend()) == "matmul":
        return sample_points_matmul(maps, x, y)
    return sample_points(maps, x, y)


def _match_cost(cls_logits, mask_logits, codes, x, y, cfg: LossConfig):
    """Per image: cost 2*class + 5*mask-BCE + 5*dice on shared uniform points -> (Q, K).

    The Q masks are sampled at the shared points as rows of the (h*w, Q) transposed maps: a
    gather of whole rows, with the query axis minor."""
    k, (q, h, w) = cfg.num_classes, mask_logits.shape
    prob = jax.nn.softmax(cls_logits, -1)[:, :k]
    idx, wts = bilinear_corners(x, y, h, w)  # (4, P)
    rows = mask_logits.reshape(q, h * w).T[idx]  # (4, P, Q)
    pred = (rows.astype(jnp.float32) * wts[..., None]).sum(0)  # (P, Q)
    tgt = label_points(codes, x, y)  # (K, P)
    n = x.shape[0]
    cost_mask = (jax.nn.softplus(-pred).T @ tgt.T + jax.nn.softplus(pred).T @ (1.0 - tgt).T) / n
    sig = jax.nn.sigmoid(pred)
    denom = sig.sum(0)[:, None] + tgt.sum(-1)[None, :] + 1.0
    cost_dice = 1.0 - (2.0 * sig.T @ tgt.T + 1.0) / denom
    return cfg.class_weight * -prob + cfg.mask_weight * cost_mask + cfg.dice_weight * cost_dice


def most_uncertain(uncertainty: jax.Array, x: jax.Array, y: jax.Array, n: int, sort: bool):
    """The points (x, y) of the ``n`` largest ``uncertainty`` along the last axis, in
    ``lax.top_k``'s order (largest first, ties by index). ``sort``: by a stable sort that carries
    the coordinates, the same points without gathering them by the top-k indices (on TPU the
    compiler counts that gather at 7.9 GiB per set at the recipe's sizes, the sort at 0.26)."""
    if sort:
        _, x, y = jax.lax.sort((-uncertainty, x, y), dimension=-1, is_stable=True, num_keys=1)
        return x[..., :n], y[..., :n]
    _, top = jax.lax.top_k(uncertainty, n)
    return jnp.take_along_axis(x, top, -1), jnp.take_along_axis(y, top, -1)


def _mask_terms(mask_logits, codes, match, valid, over, rand, cfg: LossConfig):
    """Per image: summed point BCE and dice of the matched pairs on importance-sampled points
    (``over``, ``rand``: (2, K, P') coordinates)."""
    pred = mask_logits[match]  # (K, h, w), target slot k <- its matched query
    uncertainty = -jnp.abs(_sample(jax.lax.stop_gradient(pred), *over, cfg.sampling))
    tpu = resolve_sampling(cfg.sampling, jax.default_backend()) == "matmul"
    top = most_uncertain(uncertainty, *over, cfg.num_uncertain, sort=tpu)
    x, y = (
        jax.lax.stop_gradient(jnp.concatenate([o, r], 1)) for o, r in zip(top, rand, strict=True)
    )
    logits = _sample(pred, x, y, cfg.sampling)  # (K, P)
    targets = label_points(codes, x, y)
    bce = jnp.where(valid, _bce(logits, targets).mean(-1), 0.0).sum()
    dice = jnp.where(valid, _dice(logits, targets), 0.0).sum()
    return bce, dice


def set_match(class_logits, mask_logits, codes, match_points, cfg: LossConfig) -> jax.Array:
    """Cost matrices (B, Q, K) of one prediction set (see ``set_loss_terms``); ``codes``:
    ``corner_classes`` of the labels."""
    b, q, kp1 = class_logits.shape
    if kp1 != cfg.num_classes + 1 or mask_logits.shape[:2] != (b, q) or codes.shape[0] != b:
        raise ValueError(
            f"class logits {class_logits.shape}, masks {mask_logits.shape}, labels "
            f"{codes.shape[:1]} do not fit {cfg.num_classes} classes + no-object"
        )
    x, y = match_points
    return jax.vmap(lambda *a: _match_cost(*a, cfg))(class_logits, mask_logits, codes, x, y)


def set_terms(class_logits, mask_logits, codes, valid, match, over_points, rand_points, cfg):
    """The three unweighted terms of one set given its matching (B, K) (``set_loss_terms``)."""
    b, q, _ = class_logits.shape
    k = cfg.num_classes
    targets = jnp.full((b, q), k, jnp.int32)
    targets = jax.vmap(lambda t, m, v: t.at[m].set(jnp.where(v, jnp.arange(k), k)))(
        targets, match, valid
    )
    weights = jnp.where(targets == k, cfg.no_object_weight, 1.0)
    logp = jax.nn.log_softmax(class_logits, -1)
    ce = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    bce, dice = jax.vmap(lambda *a: _mask_terms(*a, cfg), in_axes=(0, 0, 0, 0, 1, 1))(
        mask_logits, codes, match, valid, over_points, rand_points
    )
    num_masks = jnp.maximum(valid.sum(), 1).astype(class_logits.dtype)
    return {
        "class": (weights * ce).sum() / weights.sum(),
        "mask": bce.sum() / num_masks,
        "dice": dice.sum() / num_masks,
    }


def set_loss_terms(
    class_logits: jax.Array,
    mask_logits: jax.Array,
    labels: jax.Array,
    match_points: jax.Array,
    over_points: jax.Array,
    rand_points: jax.Array,
    cfg: LossConfig = LossConfig(),
) -> dict[str, jax.Array]:
    """Unweighted class / mask / dice terms of one prediction set, with explicit points.

    class_logits (B, Q, K+1); mask_logits (B, Q, h, w); labels (B, H, W) with ``ignore_index``;
    points are (x, y) in [0, 1] along a leading axis of 2 (no minor axis of 2 on TPU):
    match_points (2, B, P); over_points (2, B, K, P*ratio); rand_points (2, B, K, P - P_unc).
    Normalisation as mmdet/transformers: class CE is the weighted mean over all queries; mask
    terms are summed over matched pairs and divided by the number of targets in the batch (at
    least 1).
    """
    codes, valid = corner_classes(labels, cfg.num_classes), present_classes(labels, cfg.num_classes)
    match = jax.vmap(hungarian_match)(
        set_match(class_logits, mask_logits, codes, match_points, cfg), valid
    )
    return set_terms(class_logits, mask_logits, codes, valid, match, over_points, rand_points, cfg)


def sample_loss_points(key: jax.Array, batch: int, cfg: LossConfig) -> tuple[jax.Array, ...]:
    """Uniform (x, y) points (leading axis 2) for matching, oversampling and the random share
    of one prediction set."""
    k1, k2, k3 = jax.random.split(key, 3)
    k, p = cfg.num_classes, cfg.num_points
    return (
        jax.random.uniform(k1, (2, batch, p)),
        jax.random.uniform(k2, (2, batch, k, cfg.num_oversampled)),
        jax.random.uniform(k3, (2, batch, k, p - cfg.num_uncertain)),
    )


def mask2former_loss(
    outputs: dict[str, jax.Array], labels: jax.Array, rng: jax.Array, cfg: LossConfig = LossConfig()
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mask2Former's loss: weighted terms summed over all prediction sets (aux sets, then the
    final one). Returns (scalar, named weighted terms).

    Costs and terms run one set after another (``loops.sequential_map``: only one set's
    sampled points are alive); the matchings of all sets and images are one vmapped Hungarian
    solve, so its sequential loop runs once, not once per set.
    """
    check_labels(labels)
    # float32 statistics from 16-bit outputs: class logits here, mask logits where sampled.
    logits = jnp.concatenate([outputs["aux_logits"], outputs["pred_logits"][None]])
    logits = logits.astype(jnp.float32)
    masks = jnp.concatenate([outputs["aux_masks"], outputs["pred_masks"][None]])
    keys = jax.random.split(rng, logits.shape[0])
    batch = logits.shape[1]
    points = lambda key: sample_loss_points(key, batch, cfg)

    codes = corner_classes(labels, cfg.num_classes)
    cost = loops.sequential_map(
        lambda a: set_match(a[0], a[1], codes, points(a[2])[0], cfg), (logits, masks, keys)
    )
    valid = present_classes(labels, cfg.num_classes)
    match = jax.vmap(jax.vmap(hungarian_match), (0, None))(cost, valid)

    def one_set(args):
        lg, mk, mt, key = args
        return set_terms(lg, mk, codes, valid, mt, *points(key)[1:], cfg)

    terms = loops.sequential_map(one_set, (logits, masks, match, keys))
    weighted = {
        "class": cfg.class_weight * terms["class"].sum(),
        "mask": cfg.mask_weight * terms["mask"].sum(),
        "dice": cfg.dice_weight * terms["dice"].sum(),
    }
    return sum(weighted.values()), weighted


def pixel_cross_entropy(
    logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-pixel CE of (B, h, w, K) logits resized to the (B, H, W) labels; mean over valid
    pixels (0 when there are none)."""
    check_labels(labels)
    logits = resize_bilinear(logits, labels.shape[1:3])
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    ce = -jnp.take_along_axis(logp, safe[..., None], -1)[..., 0]
    loss = jnp.where(valid, ce, 0.0).sum() / jnp.maximum(valid.sum(), 1)
    return loss, {"ce": loss}
