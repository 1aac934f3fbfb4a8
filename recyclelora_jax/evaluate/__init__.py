"""Evaluation: confusion-matrix mIoU, mmseg sliding-window inference, colourised predictions."""

from recyclelora_jax.evaluate.driver import evaluate_dataset
from recyclelora_jax.evaluate.inference import (
    logits_to_labels,
    predict_logits,
    slide_inference,
    slide_windows,
    whole_inference,
    window_counts,
)
from recyclelora_jax.evaluate.metrics import (
    confusion_matrix,
    format_table,
    iou_per_class,
    mean_iou,
    summarize,
)
from recyclelora_jax.evaluate.visualize import colorize, save_comparison

__all__ = [
    "colorize",
    "confusion_matrix",
    "evaluate_dataset",
    "format_table",
    "iou_per_class",
    "logits_to_labels",
    "mean_iou",
    "predict_logits",
    "save_comparison",
    "slide_inference",
    "slide_windows",
    "summarize",
    "whole_inference",
    "window_counts",
]
