"""Bilinear point sampling as ``grid_sample(align_corners=False, padding_mode="zeros")``,
shared by deformable attention and the set loss's point sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def bilinear_corners(points: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
    """Corner indices into a flattened (height*width) map and their bilinear weights.

    ``points`` (..., 2) are (x, y) in [0, 1] image coordinates, as ``grid_sample`` receives them
    after ``2p - 1``. Corners outside the map get weight 0 and a clipped (valid) index, which is
    ``padding_mode="zeros"``. Returns int32 (..., 4) and float (..., 4).
    """
    x = points[..., 0] * width - 0.5
    y = points[..., 1] * height - 0.5
    x0, y0 = jnp.floor(x), jnp.floor(y)
    fx, fy = x - x0, y - y0
    idx, wts = [], []
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            cx, cy = x0 + dx, y0 + dy
            inside = (cx >= 0) & (cx <= width - 1) & (cy >= 0) & (cy <= height - 1)
            flat = jnp.clip(cy, 0, height - 1) * width + jnp.clip(cx, 0, width - 1)
            idx.append(flat.astype(jnp.int32))
            wts.append(jnp.where(inside, wx * wy, 0.0))
    return jnp.stack(idx, -1), jnp.stack(wts, -1)


def sample_points(maps: jax.Array, points: jax.Array) -> jax.Array:
    """``grid_sample`` of (N, H, W) maps at (N, P, 2) normalised points -> (N, P) float32
    (16-bit maps are gathered as they are and weighted in float32)."""
    n, h, w = maps.shape
    idx, wts = bilinear_corners(points, h, w)
    vals = jnp.take_along_axis(maps.reshape(n, h * w), idx.reshape(n, -1), axis=1)
    return (vals.reshape(idx.shape).astype(jnp.float32) * wts).sum(-1)
