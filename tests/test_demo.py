"""The main job: `python train.py` (no arguments) runs the demo (here its `quick` variant)."""

from __future__ import annotations

import json
import os
import sys

from train_helpers import REPO, run_cli


def test_demo_runs_end_to_end(tmp_path):
    result = run_cli(
        [sys.executable, str(REPO / "train.py"), "--config", f"{REPO}/configs/demo.py:quick"],
        timeout=900,
        cwd=tmp_path,
        env={**os.environ, "XLA_FLAGS": ""},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    workdir = tmp_path / "runs" / "demo"
    summary = (workdir / "summary.txt").read_text()
    for method in ("recyclelora", "frozen", "lora"):
        assert method in summary and method in result.stdout
        rows = [
            json.loads(r) for r in (workdir / method / "metrics.jsonl").read_text().split("\n") if r
        ]
        evaluation = [r for r in rows if "miou" in r][-1]
        assert set(evaluation["miou"]) == {"synthetic", "photo", "dusk"}
        assert all(0.0 <= v <= 100.0 for v in evaluation["miou"].values())
    assert (workdir / "foundation.safetensors").is_file()
    assert (workdir / "predictions.png").stat().st_size > 0
    assert (tmp_path / "data" / "synthetic" / "tfds_quick" / "READY").is_file()
