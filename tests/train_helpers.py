"""Shared pieces of the tests: tiny synthetic datasets, the tiny segmentor, a tiny training
config and subprocess helpers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import ml_collections

from recyclelora_jax.config import TINY_MASK2FORMER, apply_method, base_config, smoke
from recyclelora_jax.data.synthetic import prepare_synthetic_demo
from recyclelora_jax.heads import build_head
from recyclelora_jax.models.dinov2 import ARCHS, DinoV2
from recyclelora_jax.models.segmentor import Segmentor

REPO = Path(__file__).resolve().parent.parent


def make_data(root: Path) -> dict[str, tuple[str, Path]]:
    """GTAV-layout "synthetic" style and one Cityscapes-layout "photo" style, 16 + 4 images."""
    return prepare_synthetic_demo(
        root / "raw", root / "tfds", styles=("photo",), num_train=16, num_val=4, size=(96, 48)
    )


def tiny_segmentor(head: str = "mask2former", num_classes: int = 19, **backbone) -> Segmentor:
    """The project's tiny model as the smoke config builds it: ``ARCHS["tiny"]`` with every
    block's tokens out and LayerScale 1 (so a random backbone's blocks matter), under
    ``config.TINY_MASK2FORMER`` or the linear head; ``backbone`` sets other ``DinoV2`` fields
    (a compute dtype)."""
    kwargs = TINY_MASK2FORMER if head == "mask2former" else {}
    backbone = {"out_indices": (0, 1, 2, 3), "layerscale_init": 1.0, **backbone}
    return Segmentor(DinoV2(ARCHS["tiny"], **backbone), build_head(head, num_classes, **kwargs))


def tiny_config(data: dict, method: str = "recyclelora", **train) -> ml_collections.ConfigDict:
    """The smoke config with the linear head (compiles in seconds) on the test datasets:
    3 steps of batch 8 by default."""
    c = smoke(apply_method(base_config(), method))
    c.model.head = ml_collections.ConfigDict(dict(name="linear", num_classes=19))
    gtav = str(data["gtav"][1])
    photo = str(data["cityscapes_photo"][1])
    gtav_data = dict(builder="dg_gtav", data_dir=gtav)
    c.data.update(sources=(dict(gtav_data, split="train[:16]"),), crop_size=32, workers=0)
    c.data.synthetic = None  # the test datasets are given
    c.eval.update(
        datasets=(
            dict(gtav_data, name="synthetic", split="train[16:]", profile="native"),
            dict(name="photo", builder="dg_cityscapes", data_dir=photo, profile="native"),
        ),
        mode="whole",
        max_images=0,
    )
    c.train.update(steps=3, batch_size=8, log_every=1, checkpoint_every=3, eval_every=10**6)
    c.train.update(train)
    return c


def losses(workdir: Path) -> dict[int, float]:
    """Step -> loss from a run's metrics.jsonl (training rows only)."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def write_config_file(path: Path, cfg: ml_collections.ConfigDict) -> Path:
    """A config file for train.py subprocesses that returns exactly ``cfg``."""
    path.write_text(
        "import ml_collections\n\n\ndef get_config(arg=None):\n"
        f"    return ml_collections.ConfigDict({cfg.to_dict()!r})\n"
    )
    return path


@contextlib.contextmanager
def process_group(command: Sequence[str], **kwargs) -> Iterator[subprocess.Popen]:
    """``Popen`` in its own session; on leaving (a failed assert, a timeout) the whole process
    group is killed, so no train.py or grain worker outlives its test."""
    proc = subprocess.Popen(command, start_new_session=True, **kwargs)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_cli(command: Sequence[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` with captured text output that kills the process group on timeout."""
    with process_group(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    ) as proc:
        out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)
