"""Multi-scale deformable attention (Deformable DETR) without dense (H, W) offsets grids.

PyTorch samples with ``grid_sample(align_corners=False, padding_mode="zeros")``. Two
formulations of the same bilinear weights (``models.sampling``), chosen by ``sampling``:

- ``gather``: every point becomes four corner indices into the flattened level and four
  weights; the values are gathered and the backward is a scatter-add over the value rows. The
  largest intermediate is the gathered (B, heads, Q, 4*points, head_dim) block of one level.
  Cheapest on CPU.
- ``matmul``: per level, the points' x and y interpolation weights multiply into the sampling
  matrix (B, heads, Q, h*w), applied to the values as one matmul (and its transpose in the
  backward), the matrix rebuilt in the backward rather than stored. More FLOPs, but on the
  MXU and without gathers, scatters or minor axes of 2 or 4 (TPU).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from recyclelora_jax.models.sampling import (
    SAMPLINGS,
    axis_weights,
    bilinear_corners,
    resolve_sampling,
)

Shapes = tuple[tuple[int, int], ...]


def _gather_level(level, x, y, weights, h, w):
    """level (B, heads, hw, D); x, y, weights (B, heads, Q, P) -> (B, heads, Q, D)."""
    b, heads, q, npts = x.shape
    idx, wts = bilinear_corners(x, y, h, w)  # (4, B, heads, Q, P)
    wts = (wts * weights).transpose(1, 2, 3, 0, 4).reshape(b, heads, q, 4 * npts)
    idx = idx.transpose(1, 2, 3, 0, 4).reshape(b, heads, q * 4 * npts, 1)
    gathered = jnp.take_along_axis(level, idx, axis=2).reshape(b, heads, q, 4 * npts, -1)
    return jnp.einsum("bnqk,bnqkd->bnqd", wts.astype(level.dtype), gathered)


@functools.partial(jax.checkpoint, static_argnums=(4, 5))
def _matmul_level(level, x, y, weights, h, w):
    """As ``_gather_level``, through the dense (B, heads, Q, h*w) sampling matrix: the sum over
    points of the outer products of the y and x interpolation weights, in the values' dtype
    (what the MXU reads). Written as a broadcast product and a sum, not as an einsum over
    the 4 points (a contraction of 4 on the MXU), the TPU compiler fuses the matrix into the
    matmul that reads it and never writes it to HBM (4x fewer bytes per encoder layer; see
    docs/BENCHMARKS.md). Recomputed in the backward rather than stored."""
    b, heads, q, _ = x.shape
    wy = (axis_weights(y, h) * weights[..., None]).astype(level.dtype)  # (B, heads, Q, P, h)
    wx = axis_weights(x, w).astype(level.dtype)  # (B, heads, Q, P, w)
    a = (wy[..., :, None] * wx[..., None, :]).sum(3).reshape(b, heads, q, h * w)
    return jnp.einsum("bnqs,bnsd->bnqd", a, level)


_LEVEL_SAMPLERS = {"gather": _gather_level, "matmul": _matmul_level}


def ms_deform_sample(
    values: jax.Array,
    shapes: Shapes,
    x: jax.Array,
    y: jax.Array,
    weights: jax.Array,
    sampling: str = "gather",
) -> jax.Array:
    """The deformable-attention core, one level at a time.

    values (B, S, heads, D) with S = sum(h*w) in level order; x, y (B, heads, Q, L, P) point
    coordinates in [0, 1]; weights (B, heads, Q, L, P) (already softmaxed). Returns
    (B, Q, heads*D).
    """
    b, _, heads, d = values.shape
    q, levels = x.shape[2], x.shape[3]
    if levels != len(shapes) or values.shape[1] != sum(h * w for h, w in shapes):
        raise ValueError(f"values {values.shape} / points {x.shape} vs shapes {shapes}")
    if sampling not in _LEVEL_SAMPLERS:
        raise ValueError(f"deformable sampling {sampling!r}: use one of {SAMPLINGS}")
    level_fn = _LEVEL_SAMPLERS[sampling]
    out = jnp.zeros((b, heads, q, d), values.dtype)
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        level = values[:, start : start + h * w].transpose(0, 2, 1, 3)  # (B, heads, hw, D)
        start += h * w
        pts = (t[:, :, :, lvl] for t in (x, y, weights))
        out = out + level_fn(level, *pts, h, w)
    return out.transpose(0, 2, 1, 3).reshape(b, q, heads * d)


def sampling_offset_bias(num_heads: int, num_levels: int, num_points: int) -> np.ndarray:
    """Deformable DETR's offset bias: head h looks along angle 2*pi*h/heads, point i at i+1."""
    thetas = np.arange(num_heads, dtype=np.float32) * (2.0 * math.pi / num_heads)
    grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)
    grid = grid / np.abs(grid).max(-1, keepdims=True)
    grid = np.tile(grid[:, None, None, :], (1, num_levels, num_points, 1))
    grid = grid * np.arange(1, num_points + 1, dtype=np.float32)[None, None, :, None]
    return grid.reshape(-1).astype(np.float32)


def reference_points(shapes: Shapes) -> jax.Array:
    """Pixel centres of every level, normalised to [0, 1], as (S, 2) (x, y)."""
    refs = []
    for h, w in shapes:
        ys, xs = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
        refs.append(np.stack([xs.reshape(-1), ys.reshape(-1)], -1))
    return jnp.asarray(np.concatenate(refs, 0), jnp.float32)


class MultiScaleDeformableAttention(nn.Module):
    """Deformable attention of queries over a flattened multi-level map (2-d reference points).

    ``remat`` recomputes the sampling in the backward pass instead of storing the gathered
    corner values or sampling matrices (the largest activations of the pixel decoder);
    ``sampling`` is ``gather`` or ``matmul`` (see the module docstring). With a 16-bit ``dtype`` the
    projections and the sampled values are 16-bit; the attention softmax and the sampling
    locations stay float32 (a bf16 location in [0, 1] is off by up to half a pixel of a
    128-pixel map).
    """

    num_heads: int = 8
    num_levels: int = 3
    num_points: int = 4
    remat: bool = False
    dtype: Any = None
    sampling: str = "auto"  # gather, matmul, or auto (by backend, `resolve_sampling`)

    @nn.compact
    def __call__(
        self,
        queries: jax.Array,
        refs: jax.Array,
        values: jax.Array,
        shapes: Sequence[tuple[int, int]],
    ) -> jax.Array:
        """queries (B, Q, C) (position already added), refs (B or 1, Q, 2), values (B, S, C)."""
        b, q, c = queries.shape
        heads, levels, npts = self.num_heads, self.num_levels, self.num_points
        shapes = tuple((int(h), int(w)) for h, w in shapes)
        if c % heads or len(shapes) != levels:
            raise ValueError(f"width {c} / {heads} heads, {len(shapes)} shapes vs {levels} levels")
        bias = sampling_offset_bias(heads, levels, npts)
        f32 = jnp.float32
        offsets = nn.Dense(
            heads * levels * npts * 2,
            kernel_init=nn.initializers.zeros,
            bias_init=lambda *_: jnp.asarray(bias),
            dtype=f32,
            name="sampling_offsets",
        )(queries).reshape(b, q, heads, levels, npts, 2)
        logits = nn.Dense(
            heads * levels * npts,
            kernel_init=nn.initializers.zeros,
            bias_init=nn.initializers.zeros,
            dtype=self.dtype,
            name="attention_weights",
        )(queries).reshape(b, q, heads, levels * npts)
        weights = jax.nn.softmax(logits.astype(f32), -1).reshape(b, q, heads, levels, npts)
        xavier = nn.initializers.xavier_uniform()
        v = nn.Dense(c, kernel_init=xavier, dtype=self.dtype, name="value_proj")(values)
        v = v.reshape(b, v.shape[1], heads, c // heads)
        heights = jnp.asarray([h for h, _ in shapes], f32)
        widths = jnp.asarray([w for _, w in shapes], f32)
        # Point coordinates as (B, heads, Q, L, P) arrays: x and y apart, Q not minor.
        to_points = lambda t: t.transpose(0, 2, 1, 3, 4)
        x = to_points(refs[:, :, None, None, None, 0] + offsets[..., 0] / widths[:, None])
        y = to_points(refs[:, :, None, None, None, 1] + offsets[..., 1] / heights[:, None])
        sampling = resolve_sampling(self.sampling, jax.default_backend())
        core = functools.partial(ms_deform_sample, shapes=shapes, sampling=sampling)
        if self.remat:
            core = jax.checkpoint(core)
        out = core(v, x=x, y=y, weights=to_points(weights))
        return nn.Dense(c, kernel_init=xavier, dtype=self.dtype, name="output_proj")(out)
