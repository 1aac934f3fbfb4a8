"""The main job: `python train.py` (no arguments) runs the demo's comparison; here its `quick`
variant (RecycleLoRA and the frozen backbone, one seed, 60 steps each) end to end."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from train_helpers import REPO, losses, run_cli

from recyclelora_jax.data.evaluation import eval_batches


def _best_constant_miou(data_dir) -> float:
    """mIoU (%) of the best constant prediction on the source's held-out images: that class's
    IoU (its share of the labelled pixels) over the number of classes present."""
    counts = np.zeros(19)
    for batch in eval_batches("dg_gtav", "train[16:]", str(data_dir), dataset_profile="native"):
        label = np.asarray(batch["label"]).ravel()
        counts += np.bincount(label[label < 19], minlength=19)
    return 100 * counts.max() / counts.sum() / np.count_nonzero(counts)


def test_demo_runs_the_comparison_and_learns(tmp_path):
    result = run_cli(
        [sys.executable, str(REPO / "train.py"), "--config", f"{REPO}/configs/demo.py:quick"],
        timeout=900,
        cwd=tmp_path,
        env={**os.environ, "XLA_FLAGS": ""},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    workdir = tmp_path / "runs" / "demo"
    comparison = json.loads((workdir / "comparison.json").read_text())
    assert sorted(comparison) == ["frozen", "recyclelora"]
    chance = _best_constant_miou(tmp_path / "data" / "synthetic" / "tfds_quick" / "gtav")
    for i, method in enumerate(("recyclelora", "frozen"), 1):
        assert f"[{i}/2] {method} seed 0: done in" in result.stdout
        entry = comparison[method]
        assert {"synthetic", "photo", "dusk", "target_mean"} <= set(entry)
        loss = list(losses(workdir / method / "seed_0").values())
        assert np.mean(loss[-10:]) < 0.9 * np.mean(loss[:10]), f"{method}: loss did not go down"
        assert entry["synthetic"]["runs"][0] > chance, f"{method}: the source is at chance"
        assert all(0.0 <= entry[d]["runs"][0] <= 100.0 for d in ("photo", "dusk"))
    assert comparison["recyclelora"]["target_mean"]["diff"]["baseline"] == "frozen"
    final = json.loads(result.stderr.split("final: ")[-1].splitlines()[0])
    assert final["frozen"]["dusk"] == comparison["frozen"]["dusk"]["mean"]
    assert "| recyclelora |" in (workdir / "comparison.md").read_text()
    assert (workdir / "foundation.safetensors").is_file()
    assert (workdir / "predictions.png").stat().st_size > 0
