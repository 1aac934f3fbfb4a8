"""Training metrics to a JSONL file (one object per logged step) and TensorBoard event files."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tensorboardX import SummaryWriter
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.record_writer import RecordWriter


class MetricsLog:
    """Appends to ``workdir/metrics.jsonl`` and writes scalars under ``workdir/tensorboard``.

    Nested mappings (per-dataset mIoU) become ``name/key`` scalars. Only the writing process
    (``enabled``) touches the files, so multi-host runs log once. A run resumed from
    ``resume_step`` first drops the rows and events a killed predecessor logged after that step
    (and a row or record torn by the kill), so both read as one uninterrupted run.
    """

    def __init__(self, workdir: str | Path, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        path = Path(workdir) / "metrics.jsonl"
        if path.exists():
            kept = [r for r in path.read_text().splitlines() if _row_step(r) <= resume_step]
            path.write_text("".join(r + "\n" for r in kept))
        self._file = path.open("a")
        events = Path(workdir) / "tensorboard"
        earlier = sorted(events.glob("*tfevents*"))
        for file in earlier:
            _truncate_events(file, resume_step)
        # Event files are named by the second they were opened: a suffix keeps a quick restart
        # from overwriting its predecessor's.
        self._tb = SummaryWriter(str(events), filename_suffix=f".{len(earlier)}")

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


def _row_step(row: str) -> float:
    """A metrics.jsonl row's step; a row torn by a kill sorts after every step (dropped)."""
    try:
        return json.loads(row)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def _records(path: Path) -> Iterator[bytes]:
    """The records of a TFRecord-framed event file, up to the first torn one."""
    with path.open("rb") as f:
        while len(header := f.read(12)) == 12:
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            if len(data) < length or len(f.read(4)) < 4:
                return
            yield data


def _truncate_events(path: Path, last_step: int) -> None:
    """Rewrites an event file without the events after ``last_step`` (atomically)."""
    records = list(_records(path))
    kept = [r for r in records if Event.FromString(r).step <= last_step]
    if len(kept) == len(records) and path.stat().st_size == sum(len(r) + 16 for r in records):
        return
    tmp = path.with_name(f"rewrite{os.getpid()}.tmp")  # no "tfevents": TensorBoard skips it
    writer = RecordWriter(str(tmp))
    for record in kept:
        writer.write(record)
    writer.flush()
    writer.close()
    os.replace(tmp, path)
