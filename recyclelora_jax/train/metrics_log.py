"""Training metrics to a JSONL file (one object per logged step) and TensorBoard event files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tensorboardX import SummaryWriter


class MetricsLog:
    """Appends to ``workdir/metrics.jsonl`` and writes scalars under ``workdir/tensorboard``.

    Nested mappings (per-dataset mIoU) become ``name/key`` scalars. Only the writing process
    (``enabled``) touches the files, so multi-host runs log once. A run resumed from
    ``resume_step`` first drops the rows a killed predecessor logged after that step, so the
    file reads as one uninterrupted run.
    """

    def __init__(self, workdir: str | Path, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        path = Path(workdir) / "metrics.jsonl"
        if path.exists():
            rows = path.read_text().splitlines()
            kept = [r for r in rows if json.loads(r)["step"] <= resume_step]
            path.write_text("".join(r + "\n" for r in kept))
        self._file = path.open("a")
        workdir = Path(workdir)
        self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        for name, value in _flatten(metrics):
            self._tb.add_scalar(name, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()


def _flatten(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    out = []
    for key, value in metrics.items():
        if isinstance(value, dict):
            out += _flatten(value, f"{prefix}{key}/")
        elif isinstance(value, int | float) and value is not None:
            out.append((prefix + key, float(value)))
    return out
