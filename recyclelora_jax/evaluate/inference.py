"""Sliding-window and whole-image inference with mmseg 1.x test-mode semantics.

`slide_inference` reproduces `EncoderDecoder.slide_inference`: a grid of crop-sized windows whose
last row/column is shifted back inside the image, windows smaller than the crop (no padding) when
the image is, logits summed where windows overlap and divided by the per-pixel window count. The
windows of a batch are cut and summed with traced offsets, so `predict_fn` and the helpers here
compile once per (image shape, windows per call) however many windows there are; the last call is
padded with zero-weight repeats of a window to keep its shape.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from recyclelora_jax.models.resize import resize_bilinear

PredictFn = Callable[[jax.Array], jax.Array]


class Window(NamedTuple):
    """A crop `[y1:y2, x1:x2]` of the image."""

    y1: int
    y2: int
    x1: int
    x2: int


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (int(v), int(v)) if np.isscalar(v) else tuple(int(x) for x in v)
    if len(pair) != 2 or min(pair) <= 0:
        raise ValueError(f"{name} must be a positive int or (h, w) pair, got {v!r}")
    return pair


def slide_windows(
    height: int,
    width: int,
    crop: int | Sequence[int] = 512,
    stride: int | Sequence[int] = 341,
) -> tuple[Window, ...]:
    """mmseg's window grid, row-major; every window has size min(crop, image) per axis."""
    (h_crop, w_crop), (h_stride, w_stride) = _pair(crop, "crop"), _pair(stride, "stride")
    h_grids = max(height - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(width - w_crop + w_stride - 1, 0) // w_stride + 1
    windows = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2 = min(h_idx * h_stride + h_crop, height)
            x2 = min(w_idx * w_stride + w_crop, width)
            windows.append(Window(max(y2 - h_crop, 0), y2, max(x2 - w_crop, 0), x2))
    return tuple(windows)


def window_counts(height: int, width: int, windows: Sequence[Window]) -> np.ndarray:
    """(height, width) int32: how many windows cover each pixel (mmseg's `count_mat`)."""
    counts = np.zeros((height, width), np.int32)
    for w in windows:
        counts[w.y1 : w.y2, w.x1 : w.x2] += 1
    return counts


@functools.partial(jax.jit, static_argnames=("size",))
def _cut(images: jax.Array, offsets: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(B, H, W, C) images, (n, 2) window corners -> (B * n, h, w, C) crops, batch-major."""

    def one(corner: jax.Array) -> jax.Array:
        start = (0, corner[0], corner[1], 0)
        return jax.lax.dynamic_slice(images, start, (images.shape[0], *size, images.shape[3]))

    crops = jax.vmap(one, out_axes=1)(offsets)
    return crops.reshape(-1, *crops.shape[2:])


@functools.partial(jax.jit, donate_argnums=0)
def _accumulate(
    total: jax.Array, logits: jax.Array, offsets: jax.Array, weights: jax.Array
) -> jax.Array:
    """Add (B * n, h, w, K) window logits, weighted 0/1, into the (B, H, W, K) float32 sum."""
    n = offsets.shape[0]
    logits = logits.reshape(total.shape[0], n, *logits.shape[1:]).astype(jnp.float32)

    def add(i: int, acc: jax.Array) -> jax.Array:
        start = (0, offsets[i, 0], offsets[i, 1], 0)
        window = jax.lax.dynamic_slice(acc, start, logits[:, i].shape)
        return jax.lax.dynamic_update_slice(acc, window + weights[i] * logits[:, i], start)

    return jax.lax.fori_loop(0, n, add, total)


def _checked(logits: jax.Array, batch: int, size: tuple[int, int], what: str) -> jax.Array:
    if logits.ndim != 4 or logits.shape[:3] != (batch, *size):
        raise ValueError(
            f"predict_fn returned {logits.shape} for {what}; want ({batch}, {size}, K)"
        )
    return logits


def slide_inference(
    predict_fn: PredictFn,
    images: jax.Array,
    crop: int | Sequence[int] = 512,
    stride: int | Sequence[int] = 341,
    windows_per_call: int | None = None,
) -> jax.Array:
    """(B, H, W, C) images -> (B, H, W, K) float32 logits averaged over the overlapping windows.

    `predict_fn` maps (N, h, w, C) crops to (N, h, w, K) logits; it gets B × `windows_per_call`
    crops per call (default: all windows of the batch in one call).
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, H, W, C), got shape {images.shape}")
    if windows_per_call is not None and windows_per_call < 1:
        raise ValueError(f"windows_per_call must be >= 1 or None, got {windows_per_call}")
    batch, height, width, _ = images.shape
    windows = slide_windows(height, width, crop, stride)
    per_call = min(windows_per_call or len(windows), len(windows))
    padding = -len(windows) % per_call
    corners = [(w.y1, w.x1) for w in windows]
    offsets = np.array(corners + corners[:1] * padding, np.int32)
    weights = np.array([1.0] * len(windows) + [0.0] * padding, np.float32)
    size = (windows[0].y2 - windows[0].y1, windows[0].x2 - windows[0].x1)
    total = None
    for start in range(0, len(offsets), per_call):
        chunk = jnp.asarray(offsets[start : start + per_call])
        crops = _cut(images, chunk, size)
        logits = _checked(predict_fn(crops), crops.shape[0], size, f"{crops.shape} crops")
        if total is None:
            total = jnp.zeros((batch, height, width, logits.shape[-1]), jnp.float32)
        total = _accumulate(total, logits, chunk, jnp.asarray(weights[start : start + per_call]))
    counts = window_counts(height, width, windows)
    return total / jnp.asarray(counts, jnp.float32)[None, :, :, None]


def whole_inference(predict_fn: PredictFn, images: jax.Array) -> jax.Array:
    """mmseg's "whole" mode: one forward on the full (B, H, W, C) images."""
    logits = predict_fn(images)
    return _checked(logits, images.shape[0], images.shape[1:3], f"images {images.shape}")


def predict_logits(
    predict_fn: PredictFn,
    images: jax.Array,
    mode: str = "slide",
    crop: int | Sequence[int] = 512,
    stride: int | Sequence[int] = 341,
    windows_per_call: int | None = None,
) -> jax.Array:
    """Test-mode logits at the (test-resized) image size, by `mode` "slide" or "whole"."""
    if mode == "slide":
        return slide_inference(predict_fn, images, crop, stride, windows_per_call)
    if mode == "whole":
        return whole_inference(predict_fn, images).astype(jnp.float32)
    raise ValueError(f"mode must be 'slide' or 'whole', got {mode!r}")


@functools.partial(jax.jit, static_argnames=("size",))
def logits_to_labels(logits: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(B, h, w, K) logits -> (B, *size) int32 train ids: bilinear resize to the label, argmax."""
    return jnp.argmax(resize_bilinear(logits, size), axis=-1).astype(jnp.int32)
