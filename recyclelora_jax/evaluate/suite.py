"""Evaluate a segmentor on the config's target datasets: one confusion matrix per dataset.

Every process evaluates its own contiguous slice of each dataset on its local devices (images
of different sizes need no cross-host agreement on shapes) and the small confusion matrices are
summed over processes, so one code path serves one CPU and a multi-host pod.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from recyclelora_jax.config import eval_datasets
from recyclelora_jax.data.evaluation import eval_batches, profile_for
from recyclelora_jax.evaluate.driver import evaluate_dataset
from recyclelora_jax.evaluate.metrics import summarize
from recyclelora_jax.evaluate.visualize import save_comparison
from recyclelora_jax.models.segmentor import Segmentor


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """One evaluation dataset: display name, TFDS builder, split, data_dir, resize profile."""

    name: str
    builder: str
    split: str = "validation"
    data_dir: str = ""
    profile: str = ""


def eval_sets(cfg: ml_collections.ConfigDict) -> list[EvalSet]:
    """``eval.datasets`` with the config's defaults filled in."""
    return [
        EvalSet(
            e["name"],
            e["builder"],
            e["split"] or cfg.eval.split,
            str(Path(e["data_dir"] or cfg.data.data_dir).expanduser()),
            e["profile"],
        )
        for e in eval_datasets(cfg)
    ]


MODES = ("slide", "whole")


def check_eval(cfg: ml_collections.ConfigDict) -> list[str]:
    """One line per evaluation setting or set that would fail when first evaluated (the mode,
    the window, each set's builder, data dir, split and profile), read from each prepared
    dataset's info without touching its data; empty when all is well."""
    e, problems = cfg.eval, []
    if e.mode not in MODES:
        problems.append(f"eval.mode={e.mode!r}: choose one of {', '.join(MODES)}")
    for key in ("crop_size", "stride"):
        if not (isinstance(e[key], int) and e[key] > 0):
            problems.append(f"eval.{key}={e[key]!r}: must be a positive int")
    try:
        sets = eval_sets(cfg)
    except (TypeError, ValueError) as err:
        return [*problems, f"eval.datasets: {err}"]
    for s in sets:
        try:
            profile_for(s.builder, s.profile or None)
            builder = tfds.builder(s.builder, data_dir=s.data_dir)
            if not builder.is_prepared():
                raise FileNotFoundError(
                    "not prepared there (python -m recyclelora_jax.data.prepare builds it)"
                )
            if not builder.info.splits[s.split].num_examples:
                raise ValueError("the split is empty")
        except Exception as err:  # whatever TFDS raises, it is this set's line
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            problems.append(
                f"eval set {s.name!r} ({s.builder} {s.split} in {s.data_dir}): {reason}"
            )
    return problems


def _batches(s: EvalSet, max_images: int) -> Iterator[dict]:
    batches = eval_batches(
        s.builder,
        s.split,
        s.data_dir,
        dataset_profile=s.profile or None,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    return itertools.islice(batches, max_images) if max_images else batches


def evaluate_suite(
    model: Segmentor,
    params: Any,
    cfg: ml_collections.ConfigDict,
    sets: Sequence[EvalSet] | None = None,
    progress: bool = True,
    on_prediction: Callable[[str, dict, list[np.ndarray]], None] | None = None,
) -> dict:
    """``summarize``'s dict (per-dataset mIoU and per-class IoU, mean mIoU) for ``params``.

    ``on_prediction(dataset_name, batch, predictions)`` sees every batch's label-size
    predictions (single-process runs).
    """
    if jax.process_count() > 1:  # global arrays -> host copies usable on local devices
        params = multihost_utils.process_allgather(params, tiled=True)
    predict = jax.jit(lambda p, x: model.apply({"params": p}, x, method=Segmentor.predict))
    e = cfg.eval
    confusions = {}
    for s in sets if sets is not None else eval_sets(cfg):
        conf = evaluate_dataset(
            lambda x: predict(params, x),
            _batches(s, e.max_images),
            num_classes=cfg.model.head.num_classes,
            mode=e.mode,
            crop=e.crop_size,
            stride=e.stride,
            progress=progress and jax.process_index() == 0,
            on_prediction=on_prediction and functools.partial(on_prediction, s.name),
            desc=f"eval {s.name}",
        )
        if jax.process_count() > 1:
            conf = np.asarray(multihost_utils.process_allgather(conf)).sum(0)
        confusions[s.name] = conf
    return summarize(confusions)


class PredictionSaver:
    """An ``on_prediction`` callback that keeps the first ``per_dataset`` images of every
    dataset and draws them as one image | label | prediction PNG grid."""

    def __init__(self, per_dataset: int):
        self.per_dataset = per_dataset
        self.rows: dict[str, list[tuple]] = {}

    def __call__(self, name: str, batch: dict, preds: list[np.ndarray]) -> None:
        kept = self.rows.setdefault(name, [])
        for image, label, pred in zip(batch["image"], batch["label"], preds, strict=True):
            if len(kept) < self.per_dataset:
                kept.append((np.asarray(image), np.asarray(label), pred))

    def save(self, path: str | Path) -> Path | None:
        rows = [row for kept in self.rows.values() for row in kept]
        if not rows:
            return None
        save_comparison(path, rows)
        return Path(path)
