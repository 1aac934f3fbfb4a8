"""The training run end to end on a tiny model: sharding invariance, exact resume after SIGKILL,
checkpoint compatibility, export equivalence, two processes, and the config's schedules."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import REPO, losses, make_data, tiny_config, write_config_file

from recyclelora_jax import build
from recyclelora_jax.config import base_config
from recyclelora_jax.data import pipeline
from recyclelora_jax.evaluate.suite import PredictionSaver, evaluate_suite
from recyclelora_jax.export import load_export, load_trained, merge_segmentor, save_export
from recyclelora_jax.train import loop, optim
from recyclelora_jax.train.checkpoint import (
    Checkpointer,
    CheckpointMismatchError,
    abstract_like,
)
from recyclelora_jax.train.loop import build_run, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory):
    """An uninterrupted 6-step run on one device, checkpointed every 2 steps."""
    workdir = tmp_path_factory.mktemp("reference")
    cfg = tiny_config(data, steps=6, checkpoint_every=2)
    cfg.mesh.update(data=1, fsdp=1)
    train(cfg, workdir)
    return cfg, workdir


def _trained_adapters(workdir: Path, cfg) -> dict:
    run = build_run(cfg, workdir)
    abstract = abstract_like(run.trainable)
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    try:
        return jax.device_get(ckpt.restore(abstract).trainable)
    finally:
        ckpt.close()


@pytest.mark.parametrize("mesh", [(8, 1), (4, 2)])
def test_sharded_losses_equal_single_device(reference_run, data, tmp_path, mesh):
    reference, ref_dir = reference_run
    cfg = tiny_config(data, steps=reference.train.steps, checkpoint_every=10**6)
    cfg.mesh.update(data=mesh[0], fsdp=mesh[1])
    train(cfg, tmp_path)
    got, want = losses(tmp_path), losses(ref_dir)
    assert got.keys() == want.keys()
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-5 * max(1.0, abs(want[step])), (step, got, want)


def test_sigkill_then_restart_reproduces_the_uninterrupted_run(reference_run, tmp_path):
    cfg, ref_dir = reference_run
    config_file = write_config_file(tmp_path / "cfg.py", cfg)
    workdir = tmp_path / "run"
    command = [
        sys.executable,
        str(REPO / "train.py"),
        f"--config={config_file}",
        f"--workdir={workdir}",
    ]
    proc = subprocess.Popen(
        command,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "XLA_FLAGS": ""},
    )
    step_dir = workdir / "checkpoints" / "2"
    deadline = time.time() + 300
    while not step_dir.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert step_dir.is_dir(), "the first checkpoint never appeared"
    finished = Checkpointer(workdir / "checkpoints", async_save=False)
    assert finished.latest_step() < 6, "killed too late to test resumption"
    finished.close()

    restarted = subprocess.run(
        command,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "XLA_FLAGS": ""},
        timeout=600,
    )
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "resumed from step" in restarted.stderr
    assert losses(workdir) == losses(ref_dir)
    logged = [json.loads(r)["step"] for r in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert logged == sorted(logged), "rows of the killed run after its checkpoint were kept"
    got, want = _trained_adapters(workdir, cfg), _trained_adapters(ref_dir, cfg)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_restore_into_other_config_names_the_parameter(reference_run, data, tmp_path):
    cfg, ref_dir = reference_run
    other = tiny_config(data)
    other.peft.r_main = cfg.peft.r_main + 1
    run = build_run(other, tmp_path)
    abstract = abstract_like(run.trainable)
    ckpt = Checkpointer(ref_dir / "checkpoints", async_save=False)
    with pytest.raises(CheckpointMismatchError, match=r"adapter_main/a: checkpoint shape"):
        ckpt.restore(abstract)
    ckpt.close()


def test_adapters_only_restore_and_merged_export_predict_the_same(reference_run, tmp_path):
    cfg, ref_dir = reference_run
    model, params, restored_cfg = load_trained(ref_dir)  # adapters + head over a fresh base
    assert json.loads(restored_cfg.to_json_best_effort()) == json.loads(cfg.to_json_best_effort())
    save_export(tmp_path / "model.safetensors", model, params, restored_cfg)
    plain, plain_params, _ = load_export(tmp_path / "model.safetensors")
    assert not plain.backbone.adapters
    _, merged_params = merge_segmentor(model, params)
    jax.tree.map(np.testing.assert_array_equal, plain_params, jax.device_get(merged_params))

    adapted, exported = PredictionSaver(10**6), PredictionSaver(10**6)
    r1 = evaluate_suite(model, params, cfg, progress=False, on_prediction=adapted)
    r2 = evaluate_suite(plain, plain_params, cfg, progress=False, on_prediction=exported)
    assert r1 == r2
    for name in adapted.rows:
        for a, b in zip(adapted.rows[name], exported.rows[name], strict=True):
            np.testing.assert_array_equal(a[2], b[2])


def test_non_finite_loss_stops_and_keeps_the_last_good_state(data, tmp_path, monkeypatch):
    real = loop.segmentation_loss

    def poisoned(outputs, labels, rng, cfg):
        loss, terms = real(outputs, labels, rng, cfg)
        return loss * jnp.nan, terms

    monkeypatch.setattr(loop, "segmentation_loss", poisoned)
    cfg = tiny_config(data)
    with pytest.raises(loop.NonFiniteLossError, match="loss is nan at step 1"):
        train(cfg, tmp_path)
    fresh = build_run(cfg, tmp_path / "fresh").trainable
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    assert ckpt.latest_step() == 0
    abstract = abstract_like(fresh)
    saved = ckpt.restore(abstract).trainable
    ckpt.close()
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(saved), jax.device_get(fresh))


def test_soma_recipe_trains_with_ema(data, tmp_path):
    cfg = tiny_config(data, method="soma", steps=3)
    cfg.optim.update(ema_momentum=0.5, ema_start=1)
    train(cfg, tmp_path)
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    run = build_run(cfg, tmp_path)
    state = {"tx": jax.eval_shape(run.tx.init, run.trainable), "ema": run.trainable}
    restored = ckpt.restore(abstract_like(run.trainable), abstract_like(state))
    ckpt.close()
    trained, ema = jax.device_get((restored.trainable, restored.opt_state["ema"]))
    _, params, _ = load_trained(tmp_path)  # evaluation uses the EMA weights

    def qkv_bias(tree):  # an adapted layer's bias: SoMA trains it
        return np.asarray(tree["backbone"]["blocks_3"]["attn"]["qkv"]["bias"])

    np.testing.assert_array_equal(qkv_bias(params), qkv_bias(ema))
    assert not np.array_equal(qkv_bias(ema), qkv_bias(trained))


def test_bfloat16_backbone_and_gradient_accumulation(reference_run, data, tmp_path):
    """bf16 compute in the backbone with two micro-batches: the first loss stays within bf16
    rounding of the fp32 run's; bf16 storage keeps adapters, head and optimizer in fp32."""
    _, ref_dir = reference_run
    cfg = tiny_config(data, steps=2, grad_accum=2)
    cfg.model.backbone.dtype = "bfloat16"
    cfg.mesh.update(data=1, fsdp=1)
    train(cfg, tmp_path / "compute")
    got, want = losses(tmp_path / "compute")[1], losses(ref_dir)[1]
    assert abs(got - want) <= 0.02 * want, (got, want)

    cfg.model.backbone.param_dtype = "bfloat16"
    run = build_run(cfg, tmp_path / "storage")
    layer = lambda tree: tree["backbone"]["blocks_0"]["attn"]["qkv"]
    assert layer(run.frozen)["kernel"].dtype == jnp.bfloat16
    assert layer(run.trainable)["adapter_main"]["a"].dtype == jnp.float32
    assert {x.dtype for x in jax.tree.leaves(jax.eval_shape(run.tx.init, run.trainable))} <= {
        jnp.dtype(jnp.float32),
        jnp.dtype(jnp.int32),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(reference_run, data, tmp_path):
    cfg = tiny_config(data, steps=3)
    single = tmp_path / "single"
    cfg.mesh.update(data=1, fsdp=1)
    train(cfg, single)
    cfg.mesh.update(data=-1, fsdp=1)
    config_file = write_config_file(tmp_path / "cfg.py", cfg)
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(REPO / "train.py"),
                f"--config={config_file}",
                f"--workdir={tmp_path / 'multi'}",
                f"--coordinator=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors[0][-3000:] + errors[1][-3000:]
    got, want = losses(tmp_path / "multi"), losses(single)
    assert got.keys() == want.keys() == {1, 2, 3}
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-5 * max(1.0, abs(want[step])), (got, want)


def test_config_schedules_follow_the_reference_formulas():
    cfg = base_config()
    o = build.optim_config(cfg)
    lr = optim.poly_lr(o)
    assert (o.total_steps, o.lr, o.lr_power) == (40_000, 1e-4, 0.9)
    for step in (0, 1, 20_000, 39_999, 40_000):
        want = 1e-4 * (1 - step / 40_000) ** 0.9
        assert math.isclose(float(lr(step)), want, rel_tol=1e-5, abs_tol=1e-12), step
        for start in (0.05, 0.0):  # head groups decay from 0.05; adapter groups rise from 0
            want_wd = 1e-5 + (start - 1e-5) * (1 + math.cos(math.pi * step / 40_000)) / 2
            got_wd = float(optim.cosine_wd(o, start)(step))
            assert math.isclose(got_wd, want_wd, rel_tol=1e-5, abs_tol=1e-12), (step, start)


def test_subset_zero_means_every_image_for_gtav_too(data, tmp_path, monkeypatch, caplog):
    """The sources ``train()`` hands the loader: GTAV with subset 0 draws all 16 records and
    warns nothing (it used to become the 12,403-image default and warn on every load)."""
    seen = []

    def capture(sources, **_):
        seen.extend(sources)
        raise StopIteration

    monkeypatch.setattr(loop, "make_train_loader", capture)
    with pytest.raises(StopIteration):
        train(tiny_config(data), tmp_path)
    source = pipeline.MixedSource(seen, seed=0)
    assert len(source) == 16
    assert "fewer than the subset" not in caplog.text
