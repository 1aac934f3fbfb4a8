"""Colourised predictions: Cityscapes palette, image | label | prediction PNGs."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from recyclelora_jax.classes import MEAN_RGB, PALETTE, STD_RGB

Triplet = tuple[np.ndarray, np.ndarray, np.ndarray]


def colorize(train_ids: np.ndarray, palette: Sequence[Sequence[int]] = PALETTE) -> np.ndarray:
    """(H, W) integer ids -> (H, W, 3) uint8 colours; ignore (255) and unknown ids are black."""
    ids = np.asarray(train_ids)
    if ids.ndim != 2:
        raise ValueError(f"colorize wants an (H, W) id map, got shape {ids.shape}")
    table = np.asarray(palette, np.uint8)
    known = (ids >= 0) & (ids < len(table))
    out = np.zeros((*ids.shape, 3), np.uint8)
    out[known] = table[ids[known]]
    return out


def to_uint8_image(
    image: np.ndarray, mean: Sequence[float] = MEAN_RGB, std: Sequence[float] = STD_RGB
) -> np.ndarray:
    """Undo the normalisation of an (H, W, 3) float image; a uint8 image is returned as is."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"images must be (H, W, 3), got shape {image.shape}")
    if image.dtype == np.uint8:
        return image
    pixels = image.astype(np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def comparison_row(
    image: np.ndarray,
    label: np.ndarray,
    pred: np.ndarray,
    gap: int = 4,
    mean: Sequence[float] = MEAN_RGB,
    std: Sequence[float] = STD_RGB,
) -> np.ndarray:
    """image | label | prediction side by side at the label's size (the image is resized to it)."""
    label, pred = np.asarray(label), np.asarray(pred)
    if label.shape != pred.shape:
        raise ValueError(f"label {label.shape} and prediction {pred.shape} differ in shape")
    height, width = label.shape
    picture = Image.fromarray(to_uint8_image(image, mean, std)).resize(
        (width, height), Image.BILINEAR
    )
    spacer = np.full((height, gap, 3), 255, np.uint8)
    return np.concatenate(
        [np.asarray(picture), spacer, colorize(label), spacer, colorize(pred)], axis=1
    )


def save_comparison(
    path: str | os.PathLike,
    rows: Sequence[Triplet],
    gap: int = 4,
    mean: Sequence[float] = MEAN_RGB,
    std: Sequence[float] = STD_RGB,
) -> None:
    """Save a PNG grid with one image | label | prediction row per (image, label, pred) triplet.

    Rows of different sizes are left-aligned on a white background.
    """
    if not rows:
        raise ValueError(f"save_comparison({path!s}): no rows to draw")
    strips = [comparison_row(*row, gap=gap, mean=mean, std=std) for row in rows]
    width = max(s.shape[1] for s in strips)
    height = sum(s.shape[0] for s in strips) + gap * (len(strips) - 1)
    canvas = np.full((height, width, 3), 255, np.uint8)
    top = 0
    for strip in strips:
        canvas[top : top + strip.shape[0], : strip.shape[1]] = strip
        top += strip.shape[0] + gap
    Image.fromarray(canvas).save(path)
