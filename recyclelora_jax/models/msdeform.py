"""Multi-scale deformable attention (Deformable DETR) with gather-based bilinear sampling.

PyTorch samples with ``grid_sample(align_corners=False, padding_mode="zeros")``. Here every
sampling point becomes four corner indices into the flattened level and four bilinear weights
(zero outside the map, `sampling.bilinear_corners`), so the gradient is a scatter-add over the
value rows and nothing of size (B, Q, heads, levels, points, H, W) is ever built; the largest
intermediate is the gathered (B, heads, Q, points*4, head_dim) block of one level.
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

from recyclelora_jax.models.sampling import bilinear_corners

Shapes = tuple[tuple[int, int], ...]


def ms_deform_sample(
    values: jax.Array, shapes: Shapes, locations: jax.Array, weights: jax.Array
) -> jax.Array:
    """The deformable-attention core, one level at a time.

    values (B, S, heads, D) with S = sum(h*w) in level order; locations (B, Q, heads, L, P, 2) in
    [0, 1]; weights (B, Q, heads, L, P) (already softmaxed). Returns (B, Q, heads*D).
    """
    b, _, heads, d = values.shape
    q, levels, npts = locations.shape[1], locations.shape[3], locations.shape[4]
    if levels != len(shapes) or values.shape[1] != sum(h * w for h, w in shapes):
        raise ValueError(f"values {values.shape} / locations {locations.shape} vs shapes {shapes}")
    out = jnp.zeros((b, heads, q, d), values.dtype)
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        level = values[:, start : start + h * w].transpose(0, 2, 1, 3)  # (B, heads, hw, D)
        start += h * w
        idx, wts = bilinear_corners(locations[:, :, :, lvl], h, w)  # (B, Q, heads, P, 4)
        wts = wts * weights[:, :, :, lvl, :, None]
        idx = idx.transpose(0, 2, 1, 3, 4).reshape(b, heads, q * npts * 4)
        wts = wts.transpose(0, 2, 1, 3, 4).reshape(b, heads, q, npts * 4)
        gathered = jnp.take_along_axis(level, idx[..., None], axis=2)
        gathered = gathered.reshape(b, heads, q, npts * 4, d)
        out = out + jnp.einsum("bnqk,bnqkd->bnqd", wts.astype(values.dtype), gathered)
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
    corner values (the largest activations of the pixel decoder). With a 16-bit ``dtype`` the
    projections and the sampled values are 16-bit; the attention softmax and the sampling
    locations stay float32 (a bf16 location in [0, 1] is off by up to half a pixel of a
    128-pixel map).
    """

    num_heads: int = 8
    num_levels: int = 3
    num_points: int = 4
    remat: bool = False
    dtype: Any = None

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
        normalizer = jnp.asarray([[w, h] for h, w in shapes], f32)
        locations = refs[:, :, None, None, None, :] + offsets / normalizer[:, None, :]
        core = functools.partial(ms_deform_sample, shapes=shapes)
        if self.remat:
            core = jax.checkpoint(core)
        out = core(v, locations=locations, weights=weights)
        return nn.Dense(c, kernel_init=xavier, dtype=self.dtype, name="output_proj")(out)
