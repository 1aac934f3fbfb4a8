"""Resizing with PyTorch's `F.interpolate` semantics (`align_corners=False`).

The reference resizes position embeddings, patch kernels and feature maps with
`torch.nn.functional.interpolate`; `jax.image.resize(method="cubic")` is *not* the same function
(Keys a=-0.5 instead of PyTorch's a=-0.75). Everything here goes through
`jax.image.scale_and_translate`, which reproduces both of PyTorch's call forms exactly:

* ``size=(h, w)``: the sampling scale is ``out / in`` per axis;
* ``scale_factor=s``: the output is ``floor(in * s)`` but sampling uses ``s`` itself, which is
  what DINOv2's ``interpolate_offset`` trick relies on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

# PyTorch mode -> (jax method without antialias, jax method with antialias).
# torch's antialiased bicubic uses the a=-0.5 kernel (PIL's), its plain bicubic a=-0.75.
_METHODS = {
    "bicubic": ("cubic-pytorch", "cubic"),
    "bilinear": ("linear", "linear"),
}

# One compiled call instead of dozens of eagerly dispatched ops when used outside `jit`
# (checkpoint conversion); inside a `jit` it is simply inlined.
_scale_and_translate = jax.jit(
    jax.image.scale_and_translate, static_argnames=("shape", "spatial_dims", "method", "antialias")
)


def torch_interpolate(
    x: jax.Array,
    spatial_dims: Sequence[int],
    *,
    size: Sequence[int] | None = None,
    scale_factor: Sequence[float] | None = None,
    mode: str = "bicubic",
    antialias: bool = False,
) -> jax.Array:
    """`torch.nn.functional.interpolate(..., align_corners=False)` over `spatial_dims` of `x`."""
    if (size is None) == (scale_factor is None):
        raise ValueError("give exactly one of size or scale_factor")
    if mode not in _METHODS:
        raise ValueError(f"mode must be one of {sorted(_METHODS)}, got {mode!r}")
    spatial_dims = tuple(spatial_dims)
    in_sizes = [x.shape[d] for d in spatial_dims]
    if size is not None:
        out_sizes = [int(s) for s in size]
        scales = [o / i for o, i in zip(out_sizes, in_sizes, strict=True)]
    else:
        scales = [float(s) for s in scale_factor]
        out_sizes = [math.floor(i * s) for i, s in zip(in_sizes, scales, strict=True)]
    if out_sizes == in_sizes and all(s == 1.0 for s in scales):
        return x
    shape = list(x.shape)
    for d, o in zip(spatial_dims, out_sizes, strict=True):
        shape[d] = o
    method = _METHODS[mode][int(antialias)]
    dtype = x.dtype
    out = _scale_and_translate(
        x.astype(jnp.float32),
        shape=tuple(shape),
        spatial_dims=spatial_dims,
        scale=jnp.asarray(scales, jnp.float32),
        translation=jnp.zeros(len(spatial_dims), jnp.float32),
        method=method,
        antialias=antialias,
    )
    return out.astype(dtype)


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """Bilinear resize of an NHWC map to `size` = (h, w), `align_corners=False`, no antialias."""
    return torch_interpolate(x, (1, 2), size=size, mode="bilinear")
