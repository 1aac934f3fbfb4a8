"""One pass over an evaluation set: inference, resize to the label, confusion matrix."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from recyclelora_jax.classes import NUM_CLASSES
from recyclelora_jax.evaluate.inference import PredictFn, logits_to_labels, predict_logits
from recyclelora_jax.evaluate.metrics import confusion_matrix

# Called with the batch and its predictions (host int32 arrays, one per image, at label size);
# single-process only, as it pulls the predictions to this host.
PredictionCallback = Callable[[Mapping[str, Any], list[np.ndarray]], None]


def _label_groups(
    logits: jax.Array, labels: Any, file_names: Any
) -> list[tuple[jax.Array, jax.Array]]:
    """Pair logits with labels: the whole batch for a (B, H, W) array (keeps a sharded batch
    whole), one image at a time for a list of per-image labels of different sizes."""
    batch = logits.shape[0]
    if isinstance(labels, list | tuple):
        if len(labels) != batch or any(np.ndim(label) != 2 for label in labels):
            shapes = [np.shape(label) for label in labels]
            raise ValueError(f"batch {file_names!r}: want {batch} (H, W) labels, got {shapes}")
        return [(logits[i : i + 1], jnp.asarray(label)[None]) for i, label in enumerate(labels)]
    if np.ndim(labels) != 3 or np.shape(labels)[0] != batch:
        raise ValueError(
            f"batch {file_names!r}: labels must be ({batch}, H, W), got {np.shape(labels)}"
        )
    return [(logits, jnp.asarray(labels))]


def evaluate_dataset(
    predict_fn: PredictFn,
    batches: Iterable[Mapping[str, Any]],
    num_classes: int = NUM_CLASSES,
    mode: str = "slide",
    crop: int | Sequence[int] = 512,
    stride: int | Sequence[int] = 341,
    progress: bool = True,
    on_prediction: PredictionCallback | None = None,
    windows_per_call: int | None = None,
    desc: str = "eval",
) -> np.ndarray:
    """(num_classes, num_classes) int64 confusion matrix of `predict_fn` over `batches`.

    Each batch is {"image": (B, h, w, 3) float32 test-resized normalised images, "label":
    (B, H0, W0) int labels at original resolution or a list of B (H0, W0) labels, "file_name"}.
    Logits are resized to each label's size before the argmax, as mmseg does.
    """
    total = np.zeros((num_classes, num_classes), np.int64)
    total_batches = len(batches) if isinstance(batches, Sequence) else None
    for batch in tqdm(batches, total=total_batches, desc=desc, disable=not progress):
        missing = {"image", "label"} - set(batch)
        if missing:
            raise KeyError(f"evaluation batch lacks {sorted(missing)}; keys are {sorted(batch)}")
        images = jnp.asarray(batch["image"])
        logits = predict_logits(predict_fn, images, mode, crop, stride, windows_per_call)
        preds = []
        for group_logits, labels in _label_groups(logits, batch["label"], batch.get("file_name")):
            pred = logits_to_labels(group_logits, labels.shape[1:])
            total += np.asarray(confusion_matrix(labels, pred, num_classes), np.int64)
            preds.append(pred)
        if on_prediction is not None:
            on_prediction(batch, [np.asarray(p) for pred in preds for p in pred])
    return total
