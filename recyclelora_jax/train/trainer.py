"""The training run, top to bottom: mesh, data, model and abstract shapes, adapters, optimizer,
shardings, restore, step, and the loop with logging, evaluation and checkpoints.

The state is one pytree ``{"trainable", "opt", "ema", "step"}``; the frozen backbone is an
argument of the step, never differentiated and never in the optimizer. Everything that decides
the run (data order, loss point sampling) is a function of the config seed and the step, so a
resumed run repeats the uninterrupted one.

``abstract_train_state`` and ``make_train_step`` give the exact jitted step this module runs and
its arguments as shapes with shardings, for any mesh, without loading or initialising weights:
``make_train_step(setup).lower(state, frozen, batch).compile()`` ahead of time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from tqdm import tqdm

from recyclelora_jax import build, heads, recipe
from recyclelora_jax.config import data_sources
from recyclelora_jax.data.pipeline import Source, make_train_loader
from recyclelora_jax.data.synthetic import prepare_synthetic_once
from recyclelora_jax.evaluate.suite import check_eval
from recyclelora_jax.losses import LossConfig
from recyclelora_jax.models import loops
from recyclelora_jax.models.dinov2 import DinoV2
from recyclelora_jax.models.segmentor import Segmentor
from recyclelora_jax.train import optim
from recyclelora_jax.train.checkpoint import Checkpointer, check_base, fingerprint
from recyclelora_jax.train.metrics_log import MetricsLog
from recyclelora_jax.train.sharding import (
    batch_sharding,
    check_batch_size,
    global_batch,
    make_mesh,
    replicated,
    tree_shardings,
)

log = logging.getLogger(__name__)
Params = dict[str, Any]
State = dict[str, Any]  # {"trainable", "opt", "ema" (None without EMA), "step"}
Evaluator = Callable[[Segmentor, Params, int], dict]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/Inf; the last good state has been checkpointed."""


class Preempted(RuntimeError):
    """SIGTERM stopped the run; its state has been checkpointed and a rerun resumes it."""


class EvaluationError(RuntimeError):
    """The final evaluation failed; the trained state is checkpointed."""


class ConfigError(ValueError):
    """Config values that would fail later, one line each."""


@dataclasses.dataclass(frozen=True)
class Setup:
    """What the step is built from: config, adapted model, labels of the full parameter tree
    (``recipe``), the optimizer over the trainable leaves, and the mesh."""

    cfg: ml_collections.ConfigDict
    model: Segmentor
    labels: Params
    tx: optax.GradientTransformation
    mesh: jax.sharding.Mesh


# ------------------------------------------------------------------------- config check


def check_config(cfg: ml_collections.ConfigDict) -> list[str]:
    """One line per training value that would fail only after building and compiling."""
    problems = []

    def at_least(section: str, key: str, minimum: int = 1) -> bool:
        value = cfg[section][key]
        if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
            return True
        problems.append(f"{section}.{key}={value!r}: must be an integer >= {minimum}")
        return False

    t = cfg.train
    for key in ("steps", "log_every", "checkpoint_every", "eval_every", "keep_checkpoints"):
        at_least("train", key)
    if at_least("train", "batch_size") and at_least("train", "grad_accum"):
        if t.batch_size % t.grad_accum:
            problems.append(
                f"train.grad_accum={t.grad_accum}: does not divide train.batch_size={t.batch_size}"
            )
        elif (t.batch_size // t.grad_accum) % jax.device_count():
            problems.append(
                f"train.batch_size={t.batch_size}: its micro-batches of "
                f"{t.batch_size // t.grad_accum} do not split over {jax.device_count()} devices"
            )
    at_least("data", "crop_size")
    at_least("data", "workers", minimum=0)
    return problems


# ------------------------------------------------------------------ model and abstract shapes


def abstract_train_state(
    cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, backbone: DinoV2 | None = None
) -> tuple[Setup, State, Params, dict[str, jax.ShapeDtypeStruct]]:
    """``(setup, state, frozen, batch)``: the step's arguments as ``jax.ShapeDtypeStruct``s
    carrying their shardings on ``mesh``, for ``backbone`` (default: the config's architecture).
    Loads no weights, runs no adapter init: everything is traced abstractly."""
    model, params, _ = build.segmentor_shapes(cfg, backbone)
    part = recipe.partition(cfg, model.backbone.arch, params)
    trainable, frozen = part.trainable, part.frozen
    tx = optim.make_optimizer(optim.optim_config(cfg), part.plan.groups, part.trainable_labels)
    state = {
        "trainable": trainable,
        "opt": jax.eval_shape(tx.init, trainable),
        "ema": trainable if cfg.optim.ema_momentum else None,
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    crop = cfg.data.crop_size
    n = cfg.train.batch_size
    batch = {
        "image": jax.ShapeDtypeStruct((n, crop, crop, 3), jnp.float32),
        "label": jax.ShapeDtypeStruct((n, crop, crop), jnp.int32),
    }
    shard = lambda tree, sh: jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh
    )
    setup = Setup(cfg, model, part.labels, tx, mesh)
    sh_state, sh_frozen, sh_batch = _shardings(setup, state, frozen)
    return setup, shard(state, sh_state), shard(frozen, sh_frozen), shard(batch, sh_batch)


def _shardings(setup: Setup, state: State, frozen: Params) -> tuple[Any, Any, Any]:
    """Parameters and optimizer state split by the FSDP rule, the step and batch scalars
    replicated, the batch over every device."""
    mesh = setup.mesh
    state_sh = {
        "trainable": tree_shardings(mesh, state["trainable"]),
        "opt": tree_shardings(mesh, state["opt"]),
        "ema": tree_shardings(mesh, state["ema"]),
        "step": replicated(mesh),
    }
    batch_sh = {"image": batch_sharding(mesh), "label": batch_sharding(mesh)}
    return state_sh, tree_shardings(mesh, frozen), batch_sh


# ------------------------------------------------------- adapters, optimizer, shardings


def initial_train_state(
    cfg: ml_collections.ConfigDict, workdir: Path, mesh: jax.sharding.Mesh
) -> tuple[Setup, State, Params, State]:
    """``(setup, state, frozen, abstract state)`` of a fresh run, placed on ``mesh``: the base
    weights, the recipe's adapters (host-side init, cached in the workdir), the head, the
    optimizer state and step 0."""
    backbone, base = build.load_backbone_weights(cfg, cfg.seed)
    setup, abstract, abstract_frozen, _ = abstract_train_state(cfg, mesh, backbone)
    _, params = build.init_params(cfg, backbone, base, workdir)
    if jax.process_index() == 0:
        log.info("parameter groups:\n%s", optim.param_overview(params, setup.labels))
    trainable, frozen = recipe.split_trainable(params, setup.labels)
    del base, params
    place = lambda tree, like: jax.device_put(tree, jax.tree.map(lambda x: x.sharding, like))
    trainable, frozen = place(trainable, abstract["trainable"]), place(frozen, abstract_frozen)
    opt_sh = jax.tree.map(lambda x: x.sharding, abstract["opt"])
    state = {
        "trainable": trainable,
        "opt": jax.jit(setup.tx.init, out_shardings=opt_sh)(trainable),
        # A copy: the step donates (and so deletes) the trainable buffers.
        "ema": jax.tree.map(jnp.copy, trainable) if cfg.optim.ema_momentum else None,
        "step": jax.device_put(jnp.int32(0), abstract["step"].sharding),
    }
    return setup, state, frozen, abstract


# ------------------------------------------------------------------------------------ step


def loss_config(cfg: ml_collections.ConfigDict) -> LossConfig:
    h = cfg.model.head
    sampling = h.get("sampling", "auto")  # one switch for the head's and the loss's sampling
    return LossConfig(num_classes=h.num_classes, sampling=sampling, **h.get("loss", {}))


def head_loss(cfg: ml_collections.ConfigDict) -> Callable:
    """The config's head's own loss (``heads.HEADS``) with the config's loss settings:
    ``(outputs, labels, rng) -> (loss, terms)``."""
    loss, loss_cfg = heads.head_spec(cfg.model.head.name).loss, loss_config(cfg)
    return lambda outputs, labels, rng: loss(outputs, labels, rng, loss_cfg)


def make_loss_fn(setup: Setup) -> Callable:
    """The step's loss ``(trainable, frozen, images, labels, rng) -> (loss, terms)`` on the
    merged tree; the step differentiates its first argument (tests take its gradients to drive
    reference optimizers; the rng of step ``t`` is ``fold_in(key(cfg.seed), t)``)."""
    model, loss = setup.model, head_loss(setup.cfg)

    def loss_fn(trainable, frozen, images, labels, rng):
        params = recipe.merge_trees(trainable, frozen)
        return loss(model.apply({"params": params}, images, train=True), labels, rng)

    return loss_fn


def make_train_step(setup: Setup, state: State, frozen: Params) -> Callable:
    """The jitted step ``(state, frozen, batch) -> (state, metrics)`` with explicit shardings
    (from the abstract ``state`` and ``frozen``), the state donated, optional gradient
    accumulation and the EMA update; a non-finite loss leaves the state unchanged."""
    cfg, tx = setup.cfg, setup.tx
    accum = cfg.train.grad_accum
    key = jax.random.key(cfg.seed)
    lr = optim.poly_lr(optim.optim_config(cfg))
    momentum, ema_start = cfg.optim.ema_momentum, cfg.optim.ema_start
    grad_fn = jax.value_and_grad(make_loss_fn(setup), has_aux=True)

    def accumulated_grad_fn(trainable, frozen, images, labels, rng):
        """Mean of ``grad_fn`` over ``accum`` micro-batches, one alive at a time."""
        micro = [x.reshape(accum, -1, *x.shape[1:]) for x in (images, labels)]

        def body(total, xs):
            i, im, lb = xs
            out = grad_fn(trainable, frozen, im, lb, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, total, out), None

        shapes = jax.eval_shape(grad_fn, trainable, frozen, micro[0][0], micro[1][0], rng)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        total, _ = loops.scan(body, zeros, (jnp.arange(accum), *micro))
        return jax.tree.map(lambda x: x / accum, total)

    compute_grads = grad_fn if accum == 1 else accumulated_grad_fn

    def step_fn(state, frozen, batch):
        step, trainable = state["step"], state["trainable"]
        rng = jax.random.fold_in(key, step)
        # The mesh in context lets per-device kernels (Pallas attention) shard_map themselves.
        with jax.sharding.use_abstract_mesh(setup.mesh.abstract_mesh):
            (loss, terms), grads = compute_grads(
                trainable, frozen, batch["image"], batch["label"], rng
            )
        updates, opt = tx.update(grads, state["opt"], trainable)
        trainable = optax.apply_updates(trainable, updates)
        ema = state["ema"]
        if ema is not None:
            ema = optim.ema_update(ema, trainable, step, momentum, ema_start)
        new = {"trainable": trainable, "opt": opt, "ema": ema, "step": step + 1}
        # A non-finite loss must not reach the state: keep the last good one (the inputs are
        # donated, so the host could not restore them afterwards).
        finite = jnp.isfinite(loss)
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        metrics = {"loss": loss, **terms, "lr": lr(step), "grad_norm": optax.tree.norm(grads)}
        return new, metrics

    state_sh, frozen_sh, batch_sh = _shardings(setup, state, frozen)
    return jax.jit(
        step_fn,
        in_shardings=(state_sh, frozen_sh, batch_sh),
        out_shardings=(state_sh, replicated(setup.mesh)),
        donate_argnums=(0,),
    )


# ------------------------------------------------------------------------------------ loop


def train(
    cfg: ml_collections.ConfigDict, workdir: str | Path, evaluate_fn: Evaluator | None = None
) -> dict:
    """Train to ``cfg.train.steps``, resuming from the latest checkpoint in ``workdir``.
    Returns the last logged metrics (and evaluation results, if any)."""
    problems = check_config(cfg) + (check_eval(cfg) if evaluate_fn else [])
    if problems:
        raise ConfigError("bad config:\n  " + "\n  ".join(problems))
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t = cfg.train
    main_process = jax.process_index() == 0

    # --- mesh
    mesh = make_mesh(**cfg.mesh)
    local_batch = check_batch_size(t.batch_size, mesh)

    # --- data
    d = cfg.data
    if d.synthetic:  # the smoke config writes and builds its own small dataset first
        prepare_synthetic_once(**d.synthetic)
    sources = []
    for s in data_sources(cfg):  # builder, split, subset, own data dir ("" = data.data_dir)
        data_dir = str(Path(s["data_dir"] or d.data_dir).expanduser())
        sources.append(Source(s["builder"], s["split"], data_dir, s["subset"]))
    batches = iter(
        make_train_loader(
            sources,
            batch_size=local_batch,
            crop_size=(d.crop_size, d.crop_size),
            pad_raw=d.get("pad_raw", False),  # configs written before the option: off
            seed=cfg.seed,
            num_workers=d.workers,
        )
    )

    # --- model, adapters, optimizer and shardings
    setup, state, frozen, abstract = initial_train_state(cfg, workdir, mesh)
    base = fingerprint(frozen)

    # --- restore
    ckpt = Checkpointer(workdir / "checkpoints", keep=t.keep_checkpoints)
    start = 0
    if ckpt.latest_step() is not None:
        restored = ckpt.restore(
            abstract["trainable"], {"tx": abstract["opt"], "ema": abstract["ema"]}
        )
        where = ckpt.directory / str(restored.step)
        check_base(restored.meta, base, cfg.model.backbone.weights, where, allow=t.allow_other_base)
        start = restored.step
        state = {
            "trainable": restored.trainable,
            "opt": restored.opt_state["tx"],
            "ema": restored.opt_state["ema"],
            "step": jax.device_put(jnp.int32(start), abstract["step"].sharding),
        }
        batches.set_state(restored.data_iter["state"].encode())
        log.info("resumed from step %d in %s", start, ckpt.directory)

    # --- step
    step_fn = make_train_step(setup, abstract, frozen)

    # --- loop with logging, evaluation and checkpoints
    meta = {
        "config": json.loads(cfg.to_json_best_effort()),
        "base_weights": cfg.model.backbone.weights,
        "base_fingerprint": base,
    }
    metrics_log = MetricsLog(workdir, enabled=main_process, resume_step=start)
    preemption = _Preemption()

    def save(step: int) -> None:
        ckpt.save(
            step,
            trainable=state["trainable"],
            opt_state={"tx": state["opt"], "ema": state["ema"]},
            data_iter={"state": batches.get_state().decode()},
            meta=meta,
        )

    def evaluate(step: int) -> dict | None:
        """The evaluation results, or None after a logged failure (the checkpoint is saved)."""
        weights = state["ema"] if state["ema"] is not None else state["trainable"]
        try:
            return evaluate_fn(setup.model, recipe.merge_trees(weights, frozen), step)
        except Exception as err:
            if step == t.steps:
                raise EvaluationError(
                    f"the final evaluation (step {step}) failed: {err}; the trained "
                    f"state is checkpointed in {ckpt.directory}"
                ) from err
            log.exception("evaluation at step %d failed; training continues", step)
            return None

    last: dict = {}
    bar = tqdm(
        range(start, t.steps), initial=start, total=t.steps, desc="train", disable=not main_process
    )
    tick = time.perf_counter()
    try:
        for step in bar:
            state, metrics = step_fn(state, frozen, global_batch(next(batches), mesh))
            if not math.isfinite(float(metrics["loss"])):
                raise NonFiniteLossError(
                    f"loss is {float(metrics['loss'])} at step {step + 1}; stopped with the "
                    f"state of step {step} checkpointed in {ckpt.directory}"
                )
            done = step + 1
            if done % t.log_every == 0 or done == t.steps:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - tick
                tick = time.perf_counter()
                steps_done = done % t.log_every or t.log_every
                metrics["step_time"] = elapsed / steps_done
                metrics["images_per_s"] = t.batch_size * steps_done / elapsed
                metrics_log.write(done, metrics)
                bar.set_postfix(
                    loss=f"{metrics['loss']:.3f}", img_s=f"{metrics['images_per_s']:.1f}"
                )
                last = metrics
            due_eval = evaluate_fn is not None and (done % t.eval_every == 0 or done == t.steps)
            # Saved before evaluating: a failing or killed evaluation loses no training.
            if (
                done % t.checkpoint_every == 0
                or done == t.steps
                or due_eval
                or preemption.requested
            ):
                save(done)
            if due_eval and not preemption.requested:
                results = evaluate(done)
                if results is not None:
                    metrics_log.write(
                        done, {"miou": results["miou"], "mean_miou": results["mean_miou"]}
                    )
                    last = {**last, **results}
            if preemption.requested:
                raise Preempted(
                    f"stopped by SIGTERM after step {done}; its checkpoint is in "
                    f"{ckpt.directory}: rerun the same command to resume"
                )
    except NonFiniteLossError:
        if ckpt.latest_step() != step:
            save(step)
        raise
    finally:
        ckpt.wait()
        ckpt.close()
        metrics_log.close()
        preemption.restore()
    return last


class _Preemption:
    """SIGTERM (pod preemption) sets a flag; the loop saves and exits at the next step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        log.warning("SIGTERM received: saving a checkpoint and stopping after this step")
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)
