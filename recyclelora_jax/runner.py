"""Shared by the entry scripts (``train.py``, ``eval.py``): quiet library logs,
multi-host set-up, and the evaluation callback of a training run."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections

from recyclelora_jax.evaluate.metrics import format_table
from recyclelora_jax.evaluate.suite import PredictionSaver, evaluate_suite
from recyclelora_jax.models.segmentor import Segmentor

log = logging.getLogger(__name__)
_CHATTY = ("/orbax/", "/tensorflow_datasets/", "/jax/_src/")


class _QuietLibraries(logging.Filter):
    """Drop the libraries' INFO chatter (orbax logs every file it renames), keep warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not any(
            part in record.pathname for part in _CHATTY
        )


def quiet_library_logs() -> None:
    for name in ("absl", "jax"):
        logging.getLogger(name).addFilter(_QuietLibraries())


def init_distributed(
    coordinator: str | None, num_processes: int | None, process_id: int | None
) -> None:
    """``jax.distributed.initialize`` for multi-host runs: explicit arguments on a plain
    cluster, none under a manager JAX detects (SLURM, Cloud TPU, ...)."""
    if coordinator is None and num_processes is None:
        return
    # CPU devices need a collectives backend across processes (no effect on GPU/TPU). Asking
    # for the backend here would initialise it, which must wait for `initialize`.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)


def make_evaluator(
    cfg: ml_collections.ConfigDict, png: Path | None = None, per_dataset: int = 2
) -> Callable[[Segmentor, dict, int], dict]:
    """Evaluation callback for `train`: logs the per-class table; with ``png``, the last
    evaluation also draws ``per_dataset`` image | label | prediction rows of every dataset."""

    def evaluate(model: Segmentor, params: dict, step: int) -> dict:
        final = png is not None and step == cfg.train.steps
        saver = PredictionSaver(per_dataset) if final else None
        results = evaluate_suite(model, params, cfg, on_prediction=saver)
        if jax.process_index() == 0:
            log.info("evaluation at step %d:\n%s", step, format_table(results))
            if saver is not None and saver.save(png):
                log.info("predictions (image | label | prediction) written to %s", png)
        return results

    return evaluate
