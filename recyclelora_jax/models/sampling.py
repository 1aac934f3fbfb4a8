"""Bilinear point sampling as ``grid_sample(align_corners=False, padding_mode="zeros")``,
shared by deformable attention and the set loss's point sampling.

Two formulations with the same weights: corner indices for a gather (``bilinear_corners``:
cheap on CPU, where a gather is a load) and per-axis interpolation weights (``axis_weights``)
whose products are the dense sampling matrix of a matmul (TPU: no gather, no scatter-add in
the backward, the MXU does the work). Coordinates are separate (x, y) arrays, never a minor
axis of 2, and the four corners are the leading axis, never a minor axis of 4: TPU tiles pad
a minor axis to 128.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SAMPLINGS = ("gather", "matmul")


def resolve_sampling(name: str, platform: str) -> str:
    """``auto`` -> ``matmul`` on TPU (gathers and scatter-adds are slow there), ``gather``
    elsewhere (cheapest on CPU; not measured on GPU); other names are checked."""
    if name == "auto":
        return "matmul" if platform == "tpu" else "gather"
    if name not in SAMPLINGS:
        raise ValueError(f"point sampling {name!r}: use auto or one of {SAMPLINGS}")
    return name


def cell_origin(x: jax.Array, y: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
    """Pixel column and row (float) of the top-left corner of the bilinear cell around each point:
    ``bilinear_corners``' corners are this pixel, its right, lower and lower-right neighbours."""
    return jnp.floor(x * width - 0.5), jnp.floor(y * height - 0.5)


def bilinear_corners(
    x: jax.Array, y: jax.Array, height: int, width: int
) -> tuple[jax.Array, jax.Array]:
    """Corner indices into a flattened (height*width) map and their bilinear weights.

    ``x``, ``y`` (...) are image coordinates in [0, 1], as ``grid_sample`` receives them after
    ``2p - 1``. Corners outside the map get weight 0 and a clipped (valid) index, which is
    ``padding_mode="zeros"``. Returns int32 (4, ...) and float (4, ...).
    """
    x0, y0 = cell_origin(x, y, height, width)
    fx, fy = x * width - 0.5 - x0, y * height - 0.5 - y0
    idx, wts = [], []
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            cx, cy = x0 + dx, y0 + dy
            inside = (cx >= 0) & (cx <= width - 1) & (cy >= 0) & (cy <= height - 1)
            flat = jnp.clip(cy, 0, height - 1) * width + jnp.clip(cx, 0, width - 1)
            idx.append(flat.astype(jnp.int32))
            wts.append(jnp.where(inside, wx * wy, 0.0))
    return jnp.stack(idx), jnp.stack(wts)


def axis_weights(coord: jax.Array, size: int) -> jax.Array:
    """Interpolation weights of the ``size`` pixels of one axis at coordinates (...) in [0, 1]
    -> (..., size): ``1 - f`` at the pixel below, ``f`` at the one above, 0 elsewhere (and for
    neighbours outside the map). The product of the x and y weights is ``bilinear_corners``'
    four weights placed at their indices, with the same gradient (through ``f`` only)."""
    c = coord * size - 0.5
    c0 = jnp.floor(c)
    f = (c - c0)[..., None]
    pixel = jnp.arange(size, dtype=c.dtype) - c0[..., None]
    return jnp.where(pixel == 0, 1.0 - f, 0.0) + jnp.where(pixel == 1, f, 0.0)


def sample_points(maps: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    """``grid_sample`` of (N, H, W) maps at (N, P) normalised points -> (N, P) float32
    (16-bit maps are gathered as they are and weighted in float32)."""
    n, h, w = maps.shape
    idx, wts = bilinear_corners(x, y, h, w)
    flat = maps.reshape(n, h * w)
    vals = jax.vmap(lambda i: jnp.take_along_axis(flat, i, axis=1))(idx)
    return (vals.astype(jnp.float32) * wts).sum(0)


@jax.checkpoint
def sample_points_matmul(maps: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    """``sample_points`` as two contractions with the axis weights: (P, W) @ (W, H) per map (on
    the MXU), then a weighted sum over H; the backward to ``maps`` is a matmul, not a
    scatter-add. Float32 like ``sample_points``. Rematerialised: the (N, P, H) and (N, P, W)
    weights are recomputed in the backward instead of being stored."""
    h, w = maps.shape[1:]
    rows = jnp.einsum("npx,nyx->npy", axis_weights(x, w), maps.astype(jnp.float32))
    return (rows * axis_weights(y, h)).sum(-1)
