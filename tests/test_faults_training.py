"""Training under faults: a bad config is refused before any work, an evaluation failure loses no
checkpoint, SIGTERM saves first and exits non-zero saying a rerun resumes, another frozen base is
refused naming both files, a misspelt workdir is named and not created."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from train_helpers import REPO, process_group, run_cli, tiny_config, write_config_file

from recyclelora_jax import build
from recyclelora_jax.convert import save_converted
from recyclelora_jax.export import restore_run
from recyclelora_jax.train.checkpoint import BaseMismatchError, Checkpointer
from recyclelora_jax.train.trainer import (
    ConfigError,
    EvaluationError,
    Preempted,
    train,
)


def _steps(workdir) -> list[int]:
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False, create=False)
    try:
        return sorted(ckpt.manager.all_steps())
    finally:
        ckpt.close()


def test_bad_values_are_all_named_before_any_work(data, tmp_path):
    cfg = tiny_config(data, checkpoint_every=0, grad_accum=3, log_every=-1)
    cfg.eval.mode = "slid"
    gone = dict(name="gone", builder="dg_cityscapes", data_dir=str(tmp_path / "gone"))
    cfg.eval.datasets = (gone,)
    with pytest.raises(ConfigError) as info:
        train(cfg, tmp_path / "run", evaluate_fn=lambda *a: {})
    lines = str(info.value).splitlines()[1:]
    assert [line.strip().split("=")[0].split(" (")[0] for line in lines] == [
        "train.log_every",
        "train.checkpoint_every",
        "train.grad_accum",
        "eval.mode",
        "eval set 'gone'",
    ]
    assert "train.grad_accum=3: does not divide train.batch_size=8" in str(info.value)
    assert not (tmp_path / "run").exists() and not (tmp_path / "gone").exists()
    cfg = tiny_config(data, batch_size=0)
    with pytest.raises(ConfigError, match=r"train.batch_size=0: must be an integer >= 1"):
        train(cfg, tmp_path / "run")


def test_evaluation_failures_and_sigterm_lose_no_checkpoint(data, tmp_path, caplog):
    """Eval fails at step 2 (logged, training goes on), SIGTERM arrives during the evaluation
    of step 4 (the run stops there, saved), the rerun resumes and its final evaluation fails
    (an error naming the step, the final state saved)."""
    cfg = tiny_config(data, steps=6, eval_every=2, checkpoint_every=10**6)

    def first_run(run, params, step):
        if step == 2:
            raise OSError("evaluation data went away")
        os.kill(os.getpid(), signal.SIGTERM)
        return {"miou": {"x": 1.0}, "mean_miou": 1.0}

    with caplog.at_level(logging.ERROR), pytest.raises(Preempted, match="after step 4"):
        train(cfg, tmp_path, evaluate_fn=first_run)
    assert "evaluation at step 2 failed; training continues" in caplog.text
    assert _steps(tmp_path) == [2, 4]  # saved before each evaluation, none lost

    def failing(run, params, step):
        raise RuntimeError("out of memory")

    with pytest.raises(EvaluationError, match=r"final evaluation \(step 6\) failed: out of mem"):
        train(cfg, tmp_path, evaluate_fn=failing)
    assert _steps(tmp_path) == [2, 4, 6]


def _base_file(cfg, seed: int, path):
    model, params = build.load_backbone_weights(cfg, seed)
    save_converted(path, model, params)
    return str(path)


def test_another_frozen_base_is_refused_naming_both_files(data, tmp_path, caplog):
    cfg = tiny_config(data, steps=2, checkpoint_every=2)
    first, other = _base_file(cfg, 0, tmp_path / "a.safetensors"), tmp_path / "b.safetensors"
    _base_file(cfg, 1, other)
    cfg.model.backbone.weights = first
    train(cfg, tmp_path / "run")
    trained = jax.device_get(restore_run(tmp_path / "run")[1])
    os.replace(other, first)  # same path and shapes, other weights
    cfg.train.steps = 4
    with pytest.raises(BaseMismatchError, match=r"a\.safetensors \(sha256:.*trained on: .*a\.s"):
        train(cfg, tmp_path / "run")
    with pytest.raises(BaseMismatchError, match="--allow_other_base"):
        restore_run(tmp_path / "run")
    assert _steps(tmp_path / "run") == [2]
    _, params, _ = restore_run(tmp_path / "run", allow_other_base=True)
    np.testing.assert_array_equal(  # the trained head is what the checkpoint holds
        params["head"]["conv_seg"]["kernel"], trained["head"]["conv_seg"]["kernel"]
    )
    cfg.train.allow_other_base = True
    with caplog.at_level(logging.WARNING):
        train(cfg, tmp_path / "run")
    assert "is not the one the checkpoint" in caplog.text
    assert _steps(tmp_path / "run") == [2, 4]


def test_misspelt_workdir_is_named_and_not_created(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no checkpoints at {tmp_path / 'rnu'}"):
        restore_run(tmp_path / "rnu")
    assert not (tmp_path / "rnu").exists()
    result = run_cli([sys.executable, str(REPO / "eval.py"), f"--workdir={tmp_path / 'rnu'}"])
    assert result.returncode != 0
    assert f"no checkpoints at {tmp_path / 'rnu' / 'checkpoints'}" in result.stderr
    assert not (tmp_path / "rnu").exists()


def test_sigterm_exits_non_zero_saying_a_rerun_resumes(data, tmp_path):
    cfg = tiny_config(data, steps=200, checkpoint_every=2)
    command = [
        sys.executable,
        str(REPO / "train.py"),
        f"--config={write_config_file(tmp_path / 'cfg.py', cfg)}",
        f"--workdir={tmp_path / 'run'}",
    ]
    with process_group(command, stderr=subprocess.PIPE, text=True, cwd=tmp_path) as proc:
        # Signalled only once it has checkpointed: a SIGTERM during start-up (a loaded machine)
        # would kill it before its handler is installed.
        step_dir, deadline = tmp_path / "run" / "checkpoints" / "2", time.time() + 900
        while not step_dir.is_dir() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert step_dir.is_dir(), "the first checkpoint never appeared"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "interrupted: stopped by SIGTERM after step" in stderr
    assert "rerun the same command to resume" in stderr
    assert "final:" not in stderr
    assert max(_steps(tmp_path / "run")) < 200
