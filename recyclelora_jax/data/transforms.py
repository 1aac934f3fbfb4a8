"""The mmseg training augmentation of RECIPE.md §6 and the test-time resize, on uint8 numpy arrays.

OpenCV does the pixel work exactly as mmcv calls it (bilinear images, nearest labels, 8-bit HSV
with hue on 0..179); randomness comes from one `np.random.Generator` per example, so a pipeline
is deterministic whatever the number of workers.
"""

from __future__ import annotations

import cv2
import numpy as np

from recyclelora_jax.classes import IGNORE, MEAN_RGB, STD_RGB

MEAN = np.array(MEAN_RGB, np.float32)
STD = np.array(STD_RGB, np.float32)


def scales_for(crop: int) -> tuple[int, ...]:
    """The 16 shorter sides ``crop × 0.5 … 2.0`` (mmseg's ratio range for a ``crop`` crop)."""
    return tuple(int(crop * x * 0.1) for x in range(5, 21))


SCALES = scales_for(512)  # 256, 307, ..., 1024 (16 values), longer side capped at 4 × 512


def shortest_edge_size(h: int, w: int, short: int, max_size: int = 2048) -> tuple[int, int]:
    """(new_h, new_w) of mmseg `ResizeShortestEdge`: shorter side `short`, longer ≤ `max_size`."""
    scale = short / min(h, w)
    new_h, new_w = (short, scale * w) if h < w else (scale * h, short)
    if max(new_h, new_w) > max_size:
        factor = max_size / max(new_h, new_w)
        new_h, new_w = new_h * factor, new_w * factor
    return int(new_h + 0.5), int(new_w + 0.5)


def keep_ratio_size(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """(new_h, new_w) of mmcv `rescale_size`: the largest keep-ratio size fitting `scale`."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def resize(image: np.ndarray, label: np.ndarray | None, size: tuple[int, int]):
    """Resizes to (h, w): image bilinear, label nearest (mmcv `imresize` defaults)."""
    h, w = size
    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    if label is not None:
        label = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST)
    return image, label


def crop_box(
    label: np.ndarray,
    crop: tuple[int, int],
    rng: np.random.Generator,
    cat_max_ratio: float = 0.75,
    tries: int = 10,
) -> tuple[int, int]:
    """Top-left (y, x) of mmseg's `RandomCrop`: redraw up to `tries` times while one class covers
    ≥ `cat_max_ratio` of the crop's labelled pixels (or fewer than two classes are present);
    after the last failed try the next draw is used unchecked, as mmseg does."""

    def draw() -> tuple[int, int]:
        return (
            int(rng.integers(0, max(label.shape[0] - crop[0], 0) + 1)),
            int(rng.integers(0, max(label.shape[1] - crop[1], 0) + 1)),
        )

    y, x = draw()
    if cat_max_ratio < 1.0:
        for _ in range(tries):
            if crop_ok(label[y : y + crop[0], x : x + crop[1]], cat_max_ratio):
                break
            y, x = draw()
    return y, x


def crop_ok(label_crop: np.ndarray, cat_max_ratio: float) -> bool:
    """mmseg's acceptance test: ≥ 2 labelled classes and the largest below `cat_max_ratio`."""
    counts = np.bincount(label_crop.ravel(), minlength=256)[:IGNORE]
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg `PhotoMetricDistortion.convert`: affine in float32, clip, truncate to uint8."""
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's order: brightness, contrast (first or last, coin), saturation, hue; each p = 0.5.

    Ranges as mmseg draws them: brightness ±32, contrast and saturation ×[0.5, 1.5], hue an
    integer in [-18, 18) (numpy `randint`'s exclusive upper end) on OpenCV's 0..179 scale.
    """
    if rng.integers(2):
        img = _convert(img, beta=rng.uniform(-32, 32))
    contrast_first = rng.integers(2)
    if contrast_first and rng.integers(2):
        img = _convert(img, alpha=rng.uniform(0.5, 1.5))
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[:, :, 1] = _convert(hsv[:, :, 1], alpha=rng.uniform(0.5, 1.5))
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + int(rng.integers(-18, 18))) % 180
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not contrast_first and rng.integers(2):
        img = _convert(img, alpha=rng.uniform(0.5, 1.5))
    return img


def normalize(img: np.ndarray) -> np.ndarray:
    """(img - mean) / std in RGB, float32."""
    return (img.astype(np.float32) - MEAN) / STD


def pad(image: np.ndarray, label: np.ndarray, size: tuple[int, int]):
    """Pads bottom/right to `size`: image 0 (raw black in a pipeline's ``Pad`` step, the mean
    colour after normalisation in mmseg's data preprocessor), label 255."""
    ph, pw = size[0] - label.shape[0], size[1] - label.shape[1]
    image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=0)
    return image, np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE)


def train_augment(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    crop_size: tuple[int, int] = (512, 512),
    scales: tuple[int, ...] = SCALES,
    max_size: int = 2048,
    cat_max_ratio: float = 0.75,
    pad_raw: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Resize (random shorter side) → crop → [pad] → flip → photometric → normalise → pad.

    ``pad_raw``: the g2cbm/c2bm pipelines' ``Pad`` step right after the crop, in raw pixel
    space (black, label 255), so the padding can end up on the left and gets the photometric
    shift; without it (the multi-source pipelines) only the data preprocessor pads, after
    normalisation, with 0 at the bottom/right.
    Returns (crop_size + (3,)) float32 and (crop_size) int32 (255 = ignore).
    """
    short = scales[int(rng.integers(len(scales)))]
    image, label = resize(image, label, shortest_edge_size(*label.shape, short, max_size))
    y, x = crop_box(label, crop_size, rng, cat_max_ratio)
    image = image[y : y + crop_size[0], x : x + crop_size[1]]
    label = label[y : y + crop_size[0], x : x + crop_size[1]]
    if pad_raw:
        image, label = pad(image, label, crop_size)
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    image = photometric_distortion(np.ascontiguousarray(image), rng)
    image, label = pad(normalize(image), label, crop_size)
    return image, label.astype(np.int32)
