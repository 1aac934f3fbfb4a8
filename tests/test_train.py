"""The training run end to end on a tiny model: sharding invariance, exact resume after SIGKILL,
checkpoint compatibility, export equivalence, two processes, and the config's schedules."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
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
from PIL import Image
from train_helpers import (
    REPO,
    losses,
    process_group,
    run_cli,
    tiny_config,
    write_config_file,
)

from recyclelora_jax import heads, runner
from recyclelora_jax.config import base_config
from recyclelora_jax.data import pipeline
from recyclelora_jax.evaluate.suite import PredictionSaver, evaluate_suite
from recyclelora_jax.export import load_export, merge_segmentor, restore_run, save_export
from recyclelora_jax.train import optim, trainer
from recyclelora_jax.train.checkpoint import (
    Checkpointer,
    CheckpointMismatchError,
    abstract_like,
)
from recyclelora_jax.train.sharding import make_mesh
from recyclelora_jax.train.trainer import (
    Preempted,
    abstract_train_state,
    initial_train_state,
    train,
)


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory):
    """An uninterrupted 6-step run on one device, checkpointed every 2 steps."""
    workdir = tmp_path_factory.mktemp("reference")
    cfg = tiny_config(data, steps=6, checkpoint_every=2)
    cfg.mesh.update(data=1, fsdp=1)
    train(cfg, workdir)
    return cfg, workdir


def _abstract_state(cfg) -> dict:
    """The run's state as shapes with shardings (no weights, no adapter init)."""
    return abstract_train_state(cfg, make_mesh(**cfg.mesh))[1]


def _trained_adapters(workdir: Path, cfg) -> dict:
    abstract = _abstract_state(cfg)["trainable"]
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


def test_fsdp_splits_parameters_and_optimizer_state(data, tmp_path):
    """On a (data 4, fsdp 2) mesh every leaf of 4096 values or more (frozen kernels, the head's
    classifier, their Adam moments) is stored in halves: each device holds a shard, not a copy."""
    cfg = tiny_config(data)
    cfg.mesh.update(data=4, fsdp=2)
    _, state, frozen, _ = initial_train_state(cfg, tmp_path, make_mesh(**cfg.mesh))

    def split(x) -> bool:
        shard = x.addressable_shards[0].data.shape
        return np.prod(shard) * 2 == np.prod(x.shape) and len(x.sharding.device_set) == 8

    for name, tree in (
        ("frozen", frozen),
        ("trainable", state["trainable"]),
        ("opt", state["opt"]),
    ):
        large = [x for x in jax.tree.leaves(tree) if x.size >= 2**12]  # smaller stay replicated
        assert large, name
        assert all(map(split, large)), (name, [x.sharding.spec for x in large])
    qkv = frozen["backbone"]["blocks_0"]["attn"]["qkv"]["kernel"]
    assert qkv.addressable_shards[0].data.shape in ((64, 384), (128, 192))


def test_sigkill_then_restart_reproduces_the_uninterrupted_run(reference_run, tmp_path):
    cfg, ref_dir = reference_run
    config_file = write_config_file(tmp_path / "cfg.py", cfg)
    workdir = tmp_path / "run"
    # The subprocesses inherit this process's XLA_FLAGS (8 host devices, the package's CPU
    # convolution flag): bit-exact equality holds within one XLA:CPU setup; with 1 host device
    # XLA:CPU's Eigen convolutions split their work otherwise and step 6's loss moves by 2e-7.
    command = [
        sys.executable,
        str(REPO / "train.py"),
        f"--config={config_file}",
        f"--workdir={workdir}",
    ]
    step_dir = workdir / "checkpoints" / "2"
    with process_group(
        command,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ) as proc:
        deadline = time.time() + 300
        while not step_dir.is_dir() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    assert step_dir.is_dir(), "the first checkpoint never appeared"
    finished = Checkpointer(workdir / "checkpoints", async_save=False)
    assert finished.latest_step() < 6, "killed too late to test resumption"
    finished.close()

    restarted = run_cli(command, cwd=tmp_path)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "resumed from step" in restarted.stderr
    assert losses(workdir) == losses(ref_dir)
    final = json.loads(restarted.stderr.split("final: ")[-1].splitlines()[0])
    assert final == _evaluation_rows(workdir)[-1]["miou"] and set(final) == {"synthetic", "photo"}
    logged = [json.loads(r)["step"] for r in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert logged == sorted(logged), "rows of the killed run after its checkpoint were kept"
    got, want = _trained_adapters(workdir, cfg), _trained_adapters(ref_dir, cfg)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_restore_into_other_config_names_the_parameter(reference_run, data, tmp_path):
    _, ref_dir = reference_run
    other = tiny_config(data)
    other.adapters[0]["ranks"]["main"] += 1
    abstract = _abstract_state(other)["trainable"]
    ckpt = Checkpointer(ref_dir / "checkpoints", async_save=False)
    with pytest.raises(CheckpointMismatchError, match=r"adapter_main/a: checkpoint shape"):
        ckpt.restore(abstract)
    ckpt.close()


def test_adapters_only_restore_and_merged_export_predict_the_same(reference_run, tmp_path):
    cfg, ref_dir = reference_run
    model, params, restored_cfg = restore_run(ref_dir)  # adapters + head over a fresh base
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
    real = heads.HEADS["linear"]

    def poisoned(outputs, labels, rng, cfg):
        loss, terms = real.loss(outputs, labels, rng, cfg)
        return loss * jnp.nan, terms

    monkeypatch.setitem(heads.HEADS, "linear", dataclasses.replace(real, loss=poisoned))
    cfg = tiny_config(data)
    with pytest.raises(trainer.NonFiniteLossError, match="loss is nan at step 1"):
        train(cfg, tmp_path)
    fresh = initial_train_state(cfg, tmp_path / "fresh", make_mesh(**cfg.mesh))[1]["trainable"]
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
    state = _abstract_state(cfg)
    restored = ckpt.restore(state["trainable"], {"tx": state["opt"], "ema": state["ema"]})
    ckpt.close()
    trained, ema = jax.device_get((restored.trainable, restored.opt_state["ema"]))
    _, params, _ = restore_run(tmp_path)  # evaluation uses the EMA weights

    def qkv_bias(tree):  # an adapted layer's bias: SoMA trains it
        return np.asarray(tree["backbone"]["blocks_3"]["attn"]["qkv"]["bias"])

    np.testing.assert_array_equal(qkv_bias(params), qkv_bias(ema))
    assert not np.array_equal(qkv_bias(ema), qkv_bias(trained))


def _fixed_batch(cfg) -> dict:
    """One batch without ignore pixels: every micro-batch then averages the same pixel count,
    so the mean of micro-batch gradients is exactly the full batch's gradient."""
    rng = np.random.default_rng(0)
    n, size = cfg.train.batch_size, cfg.data.crop_size
    return {
        "image": jnp.asarray(rng.standard_normal((n, size, size, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 19, (n, size, size)), jnp.int32),
    }


def _two_steps(cfg, workdir: Path, grad_accum: int, batch: dict) -> tuple:
    """Two steps of the training step on ``batch`` from the run's initial state."""
    cfg = copy.deepcopy(cfg)
    cfg.train.grad_accum = grad_accum
    setup, state, frozen, abstract = initial_train_state(cfg, workdir, make_mesh(**cfg.mesh))
    step_fn = trainer.make_train_step(setup, abstract, frozen)
    state, first = step_fn(state, frozen, batch)
    state, second = step_fn(state, frozen, batch)
    return jax.device_get((state["trainable"], state["opt"], first, second))


@pytest.fixture(scope="module")
def fp32_steps(data, tmp_path_factory):
    """The float32 run's first two steps on the fixed batch, with 1, 2 and 4 micro-batches."""
    cfg = tiny_config(data)
    workdir = tmp_path_factory.mktemp("accum")
    return {accum: _two_steps(cfg, workdir, accum, _fixed_batch(cfg)) for accum in (1, 2, 4)}


@pytest.mark.parametrize("accum", [2, 4])
def test_gradient_accumulation_equals_the_full_batch(fp32_steps, accum):
    """Parameters, both Adam moments and the logged loss and gradient norm after two steps
    agree leaf by leaf with one full batch (float32 summation order: rtol 1e-4)."""
    want_params, want_opt, want_m1, want_m2 = fp32_steps[1]
    params, opt, m1, m2 = fp32_steps[accum]
    for got, want in ((params, want_params), (opt, want_opt)):
        jax.tree.map(
            lambda g, w: np.testing.assert_allclose(
                g, w, rtol=1e-4, atol=1e-6 * float(np.abs(w).max() + 1e-30)
            ),
            got,
            want,
        )
    for key in ("loss", "grad_norm"):
        assert float(m1[key]) == pytest.approx(float(want_m1[key]), rel=1e-5), key
        assert float(m2[key]) == pytest.approx(float(want_m2[key]), rel=1e-5), key


def test_scanned_blocks_step_equals_the_unrolled_one(fp32_steps, data, tmp_path):
    """``model.backbone.scan_layers``: two real steps give the unrolled run's parameters, Adam
    moments, loss and gradient norm (float32 summation order: rtol 1e-4)."""
    cfg = tiny_config(data)
    cfg.model.backbone.scan_layers = True
    got = _two_steps(cfg, tmp_path, 1, _fixed_batch(cfg))
    want = fp32_steps[1]
    for g, w in zip(jax.tree.leaves(got[:2]), jax.tree.leaves(want[:2]), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6 * float(np.abs(w).max() + 1e-30))
    for m, w in zip(got[2:], want[2:], strict=True):
        for key in ("loss", "grad_norm"):
            assert float(m[key]) == pytest.approx(float(w[key]), rel=1e-5), key


def test_bfloat16_storage_and_compute_run_a_step(fp32_steps, data, tmp_path):
    """bf16 frozen weights and bf16 compute, two micro-batches, through two real steps: the
    adapters, head and optimizer stay float32, the parameters move, and both losses stay within
    bf16 rounding (2 %) of the float32 run's on the same batch."""
    cfg = tiny_config(data)
    cfg.model.backbone.update(dtype="bfloat16", param_dtype="bfloat16")
    _, state, frozen, _ = initial_train_state(cfg, tmp_path, make_mesh(**cfg.mesh))
    layer = lambda tree: tree["backbone"]["blocks_0"]["attn"]["qkv"]
    assert layer(frozen)["kernel"].dtype == jnp.bfloat16
    start = jax.device_get(state["trainable"])
    trainable, opt_state, first, second = _two_steps(cfg, tmp_path, 2, _fixed_batch(cfg))
    leaves = jax.tree.leaves((trainable, opt_state))
    assert {x.dtype for x in leaves} <= {np.dtype(np.float32), np.dtype(np.int32)}
    assert all(np.isfinite(x).all() for x in leaves)
    assert not np.array_equal(
        layer(trainable)["adapter_main"]["b"], layer(start)["adapter_main"]["b"]
    )
    _, _, want_first, want_second = fp32_steps[1]
    for got, want in ((first, want_first), (second, want_second)):
        assert abs(float(got["loss"]) - float(want["loss"])) <= 0.02 * float(want["loss"])


def test_resumed_metrics_log_equals_the_uninterrupted_one(reference_run, tmp_path):
    """A run killed after logging steps 3-6 but checkpointing only step 2 resumes at 2: its
    metrics.jsonl then lists exactly the uninterrupted run's steps with the same losses, and
    keep_checkpoints=2 leaves the last two checkpoints."""
    cfg, ref_dir = reference_run
    workdir = tmp_path / "run"
    shutil.copytree(ref_dir, workdir)
    for step in ("4", "6"):
        shutil.rmtree(workdir / "checkpoints" / step)
    cfg = copy.deepcopy(cfg)
    cfg.train.keep_checkpoints = 2
    train(cfg, workdir)
    rows = lambda d: [json.loads(r) for r in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows(workdir)] == [r["step"] for r in rows(ref_dir)]
    assert losses(workdir) == losses(ref_dir)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["4", "6"]


def test_non_finite_loss_after_step_1_keeps_the_good_state(reference_run, tmp_path, monkeypatch):
    """NaN in the third step's loss: the run stops naming step 3, and the state it checkpoints
    (trainable and optimizer) is bit-identical to the uninterrupted run's step 2: the NaN never
    reached the parameters or the Adam moments."""
    cfg, ref_dir = reference_run
    real = heads.HEADS["linear"]
    third = jax.random.key_data(jax.random.fold_in(jax.random.key(cfg.seed), 2))

    def poisoned(outputs, labels, rng, loss_cfg):
        loss, terms = real.loss(outputs, labels, rng, loss_cfg)
        bad = jnp.all(jax.random.key_data(rng) == third)
        return jnp.where(bad, jnp.nan, loss), terms

    monkeypatch.setitem(heads.HEADS, "linear", dataclasses.replace(real, loss=poisoned))
    cfg = copy.deepcopy(cfg)
    cfg.train.checkpoint_every = 10**6
    with pytest.raises(trainer.NonFiniteLossError, match="loss is nan at step 3"):
        train(cfg, tmp_path)
    assert losses(tmp_path) == {k: v for k, v in losses(ref_dir).items() if k <= 2}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
    got, want = (_restored_state(d, cfg, step=2) for d in (tmp_path, ref_dir))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(got))
    jax.tree.map(np.testing.assert_array_equal, got, want)


def _restored_state(workdir: Path, cfg, step: int):
    state = _abstract_state(cfg)
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    try:
        opt = {"tx": state["opt"], "ema": None}
        restored = ckpt.restore(state["trainable"], opt, step=step)
        return jax.device_get((restored.trainable, restored.opt_state))
    finally:
        ckpt.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(reference_run, data, tmp_path):
    """Losses and the final evaluation (both datasets, every class IoU) of two processes equal
    one process's."""
    cfg = tiny_config(data, steps=3, eval_every=3)
    single = tmp_path / "single"
    cfg.mesh.update(data=1, fsdp=1)
    train(cfg, single, runner.make_evaluator(cfg))
    cfg.mesh.update(data=-1, fsdp=1)
    config_file = write_config_file(tmp_path / "cfg.py", cfg)
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    command = [sys.executable, str(REPO / "train.py"), f"--config={config_file}"]
    command += [f"--workdir={tmp_path / 'multi'}", f"--coordinator=127.0.0.1:{port}"]
    with contextlib.ExitStack() as stack:
        procs = [
            stack.enter_context(
                process_group(
                    [*command, "--num_processes=2", f"--process_id={i}"],
                    cwd=tmp_path,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=env,
                )
            )
            for i in range(2)
        ]
        errors = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors[0][-3000:] + errors[1][-3000:]
    got, want = losses(tmp_path / "multi"), losses(single)
    assert got.keys() == want.keys() == {1, 2, 3}
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-5 * max(1.0, abs(want[step])), (got, want)
    got, want = (_evaluation_rows(d) for d in (tmp_path / "multi", single))
    assert [r["step"] for r in got] == [r["step"] for r in want] == [3]
    assert set(got[0]["miou"]) == {"synthetic", "photo"}
    for name, value in want[0]["miou"].items():
        assert got[0]["miou"][name] == pytest.approx(value, abs=1e-3), (name, got, want)


def _evaluation_rows(workdir: Path) -> list[dict]:
    rows = [json.loads(r) for r in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "miou" in r]


def test_sigterm_checkpoints_stops_and_resumes_exactly(reference_run, data, tmp_path):
    """SIGTERM during step 3 (sent from the evaluation callback): the run checkpoints step 3 and
    stops there; the restarted run ends with the uninterrupted run's losses and adapters."""
    cfg, ref_dir = reference_run
    steps_seen = []

    def preempt(run, params, step):
        steps_seen.append(step)
        os.kill(os.getpid(), signal.SIGTERM)
        return {"miou": {}, "mean_miou": 0.0}

    stopped = copy.deepcopy(cfg)
    stopped.train.eval_every = 3
    with pytest.raises(Preempted, match="after step 3"):
        train(stopped, tmp_path, preempt)
    assert steps_seen == [3]
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    assert ckpt.latest_step() == 3 and ckpt.manager.all_steps() == [2, 3]
    ckpt.close()
    assert max(losses(tmp_path)) == 3
    train(cfg, tmp_path)
    assert losses(tmp_path) == losses(ref_dir)
    got, want = _trained_adapters(tmp_path, cfg), _trained_adapters(ref_dir, cfg)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_eval_cli_end_to_end(reference_run, data, tmp_path):
    """eval.py on the run's workdir (one dataset, with an export) without importing the trainer,
    the optimizer library or the training input pipeline; on the export (the same eval.json);
    and on a step directory with --images (a segmentation per image)."""
    _, ref_dir = reference_run
    env = {**os.environ, "XLA_FLAGS": ""}
    eval_py = [sys.executable, str(REPO / "eval.py")]
    args = [f"--workdir={ref_dir}", f"--out={tmp_path / 'a'}", "--datasets=photo",
            f"--export={tmp_path / 'model.safetensors'}", "--max_images=2"]  # fmt: skip
    probe = (  # eval.py as __main__, then the modules it loaded
        "import json, runpy, sys\n"
        f"sys.argv = ['eval.py', *{args!r}]\n"
        "try:\n"
        f"    runpy.run_path({str(REPO / 'eval.py')!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    first = run_cli([sys.executable, "-c", probe], cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    modules = json.loads(first.stdout.strip().splitlines()[-1])
    forbidden = ("grain", "optax", "recyclelora_jax.train.trainer", "recyclelora_jax.train.optim")
    loaded = [m for m in modules if m.split(".")[0] in forbidden[:2] or m in forbidden[2:]]
    assert not loaded, loaded
    assert "recyclelora_jax.export" in modules and "recyclelora_jax.evaluate.suite" in modules
    results = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert set(results["miou"]) == {"photo"} and len(results["iou"]["photo"]) == 19
    assert results["mean_miou"] == pytest.approx(results["miou"]["photo"])
    assert "photo" in first.stdout and (tmp_path / "model.safetensors").stat().st_size > 0
    second = run_cli(
        [*eval_py, f"--checkpoint={tmp_path / 'model.safetensors'}", f"--out={tmp_path / 'b'}",
         "--datasets=photo", "--max_images=2"],
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((tmp_path / "b" / "eval.json").read_text()) == results
    images = tmp_path / "photos"
    images.mkdir()
    for i, size in enumerate([(40, 60), (50, 30)]):
        pixels = np.random.default_rng(i).integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"p{i}.png")
    third = run_cli(
        [*eval_py, f"--checkpoint={ref_dir / 'checkpoints' / '2'}", f"--out={tmp_path / 'c'}",
         f"--images={images}", "--native_size"],  # at the test scale: a 1024 x 1536 pass
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert third.returncode == 0, third.stderr[-3000:]
    for i, size in enumerate([(40, 60), (50, 30)]):
        with Image.open(tmp_path / "c" / "images" / f"p{i}_ids.png") as ids:
            assert ids.size == size[::-1] and np.asarray(ids).max() < 19
    assert not (tmp_path / "c" / "eval.json").exists()


def test_config_schedules_follow_the_reference_formulas():
    cfg = base_config()
    o = optim.optim_config(cfg)
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

    monkeypatch.setattr(trainer, "make_train_loader", capture)
    with pytest.raises(StopIteration):
        train(tiny_config(data), tmp_path)
    source = pipeline.MixedSource(seen, seed=0)
    assert len(source) == 16
    assert "fewer than the subset" not in caplog.text
