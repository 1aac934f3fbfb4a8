"""A run killed after its last checkpoint and resumed logs each step once: the killed run's later
rows and TensorBoard events are dropped, torn ones included."""

from __future__ import annotations

import json

from tensorboardX.proto.event_pb2 import Event

from recyclelora_jax.train.metrics_log import MetricsLog, _records


def _logged(workdir) -> tuple[list[int], list[int]]:
    rows = [json.loads(r)["step"] for r in (workdir / "metrics.jsonl").read_text().splitlines()]
    events = sorted(
        (e.wall_time, e.step)
        for f in (workdir / "tensorboard").iterdir()
        for e in map(Event.FromString, _records(f))
        if any(v.tag == "loss" for v in e.summary.value)
    )
    return rows, [step for _, step in events]


def test_resume_drops_what_the_killed_run_logged_after_its_checkpoint(tmp_path):
    log = MetricsLog(tmp_path)
    for step in range(1, 7):
        log.write(step, {"loss": 1.0 / step, "miou": {"a": 0.5}})
    log.close()
    events = next((tmp_path / "tensorboard").iterdir())
    with events.open("ab") as f:  # the kill tore a record and a row
        f.write(b"\x30\x00\x00\x00\x00\x00\x00\x00\x01\x02")
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "lo')

    resumed = MetricsLog(tmp_path, resume_step=3)  # the checkpoint was at step 3
    for step in range(4, 9):
        resumed.write(step, {"loss": 2.0 / step})
    resumed.close()
    rows, steps = _logged(tmp_path)
    assert rows == list(range(1, 9))
    assert steps == list(range(1, 9))
    assert all("tfevents" in f.name for f in (tmp_path / "tensorboard").iterdir())
