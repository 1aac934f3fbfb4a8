"""Confusion matrix, per-class IoU and mIoU with mmseg's reporting conventions.

The per-batch matrix is computed on device with pure `jnp` ops, so it runs under `jit` on a batch
sharded over a mesh (XLA reduces the per-shard counts). Counts are int32 per call; the caller sums
calls into an int64 host matrix because a whole dataset (Mapillary at full resolution) overflows
int32. The reported numbers follow mmseg's `IoUMetric`: IoU per class = TP / (TP + FP + FN),
classes with an empty union are nan and skipped by the mean, everything ×100 and rounded to two
decimals; the mean over datasets is the plain mean of the per-dataset mIoUs (RECIPE.md §6).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recyclelora_jax.classes import CLASS_NAMES, NUM_CLASSES


@functools.partial(jax.jit, static_argnames=("num_classes",))
def confusion_matrix(
    labels: jax.Array, preds: jax.Array, num_classes: int = NUM_CLASSES
) -> jax.Array:
    """(num_classes, num_classes) int32 counts, rows = ground truth, columns = prediction.

    Pixels whose label is negative or >= num_classes (255 = ignore) are not counted, nor are
    predictions outside [0, num_classes) (an argmax never makes them); they land in an overflow
    bin of the bincount that is dropped.
    """
    if labels.shape != preds.shape:
        raise ValueError(f"labels {labels.shape} and preds {preds.shape} must have the same shape")
    if labels.size >= 2**31:
        raise ValueError(f"{labels.size} pixels in one call overflow the int32 counts; split it")
    labels = labels.astype(jnp.int32)
    preds = preds.astype(jnp.int32)
    bins = num_classes * num_classes
    valid = (labels >= 0) & (labels < num_classes) & (preds >= 0) & (preds < num_classes)
    index = jnp.where(valid, labels * num_classes + preds, bins)
    counts = jnp.bincount(index.reshape(-1), length=bins + 1)
    return counts[:bins].reshape(num_classes, num_classes).astype(jnp.int32)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU per class as float64 fractions; nan for classes absent from labels and predictions."""
    conf = np.asarray(conf, dtype=np.float64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {conf.shape}")
    tp = np.diag(conf)
    union = conf.sum(axis=0) + conf.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def _percent(x: float) -> float:
    return float(np.round(x * 100.0, 2))


def mean_iou(conf: np.ndarray) -> float:
    """mIoU in percent, two decimals: nan-mean over classes with a non-empty union (nan if none)."""
    iou = iou_per_class(conf)
    if np.isnan(iou).all():
        return math.nan
    return _percent(np.nanmean(iou))


def summarize(
    confusions: Mapping[str, np.ndarray], class_names: Sequence[str] = CLASS_NAMES
) -> dict:
    """JSON-ready results: {"miou": {ds: v}, "iou": {ds: {class: v}}, "mean_miou": v}.

    Values are percent with two decimals; a class absent from a dataset is None (JSON null) in
    "iou". "mean_miou" is the plain mean of the reported per-dataset mIoUs.
    """
    if not confusions:
        raise ValueError("summarize needs at least one dataset")
    results: dict = {"miou": {}, "iou": {}}
    for name, conf in confusions.items():
        iou = iou_per_class(conf)
        if len(iou) != len(class_names):
            raise ValueError(
                f"dataset {name!r}: confusion matrix has {len(iou)} classes, "
                f"class_names has {len(class_names)}"
            )
        results["miou"][name] = mean_iou(conf)
        results["iou"][name] = {
            c: (None if np.isnan(v) else _percent(v)) for c, v in zip(class_names, iou, strict=True)
        }
    results["mean_miou"] = float(np.round(np.mean(list(results["miou"].values())), 2))
    return results


def format_table(results: Mapping) -> str:
    """Printable table of `summarize`'s output: a row per class, a column per dataset."""
    datasets = list(results["miou"])
    classes = list(results["iou"][datasets[0]])
    first = max(len(c) for c in [*classes, "mIoU", "mean mIoU"])
    widths = [max(len(d), 6) for d in datasets]

    def row(head: str, cells: Sequence[str]) -> str:
        return "  ".join(
            [head.ljust(first), *(c.rjust(w) for c, w in zip(cells, widths, strict=True))]
        )

    def cell(v: float | None) -> str:
        return "-" if v is None or math.isnan(v) else f"{v:.2f}"

    lines = [row("class", datasets)]
    rule = "-" * len(lines[0])
    lines.append(rule)
    lines += [row(c, [cell(results["iou"][d][c]) for d in datasets]) for c in classes]
    lines.append(rule)
    lines.append(row("mIoU", [cell(results["miou"][d]) for d in datasets]))
    lines.append(f"{'mean mIoU'.ljust(first)}  {cell(results['mean_miou'])}")
    return "\n".join(lines)
