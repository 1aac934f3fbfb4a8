"""The training run: state on the mesh, the jitted step, logging, evaluation, checkpoints, resume.

The frozen backbone is an argument of the step, never differentiated and never in the optimizer;
the trainable subtree (adapters + head), its optimizer state and the step live in the checkpoint.
Everything that decides the run (data order, dropout-free model, loss point sampling) is a
function of the config seed and the step, so a resumed run repeats the uninterrupted one.
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

from recyclelora_jax import build, recipe
from recyclelora_jax.data.pipeline import Source, make_train_loader
from recyclelora_jax.evaluate.suite import check_eval
from recyclelora_jax.losses import segmentation_loss
from recyclelora_jax.peft.params import attach
from recyclelora_jax.train import optim
from recyclelora_jax.train.checkpoint import Checkpointer, abstract_like, check_base, fingerprint
from recyclelora_jax.train.metrics_log import MetricsLog
from recyclelora_jax.train.sharding import (
    check_batch_size,
    global_batch,
    make_mesh,
    replicated,
    tree_shardings,
)

log = logging.getLogger(__name__)
Params = dict[str, Any]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/Inf; the last good state has been checkpointed."""


class Preempted(RuntimeError):
    """SIGTERM stopped the run; its state has been checkpointed and a rerun resumes it."""


class EvaluationError(RuntimeError):
    """The final evaluation failed; the trained state is checkpointed."""


class ConfigError(ValueError):
    """Config values that would fail later, one line each."""


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


@dataclasses.dataclass
class Run:
    """Everything built from the config before the first step."""

    cfg: ml_collections.ConfigDict
    model: Any
    layout: Any
    labels: Params
    trainable: Params
    frozen: Params
    tx: optax.GradientTransformation
    mesh: jax.sharding.Mesh


def build_run(cfg: ml_collections.ConfigDict, workdir: Path) -> Run:
    """Base weights -> adapters (host-side init, cached in the workdir) -> head -> groups."""
    mesh = make_mesh(**cfg.mesh)
    backbone, base = build.load_backbone_weights(cfg, cfg.seed)
    plan = recipe.from_config(cfg, backbone.arch)
    adapted, layout = attach(
        base,
        backbone.arch,
        plan.attach,
        seed=cfg.seed,
        cache_dir=workdir / "init_cache" if cfg.init_cache else None,
        progress=jax.process_index() == 0,
    )
    model = build.build_segmentor(cfg, backbone, layout)
    head = build.init_head(model, cfg.data.crop_size, cfg.seed)
    params = {"backbone": adapted, "head": head}
    labels = optim.label_params(params, plan.labels, plan.groups)
    if jax.process_index() == 0:
        log.info("parameter groups:\n%s", optim.param_overview(params, labels))
    trainable, frozen = optim.split_trainable(params, labels)
    trainable_labels, _ = optim.split_trainable(labels, labels)
    tx = optim.make_optimizer(build.optim_config(cfg), plan.groups, trainable_labels)
    trainable = jax.device_put(trainable, tree_shardings(mesh, trainable))
    frozen = jax.device_put(frozen, tree_shardings(mesh, frozen))
    return Run(cfg, model, layout, labels, trainable, frozen, tx, mesh)


def make_step_fn(run: Run) -> Callable:
    """The jitted step ``(trainable, opt_state, frozen, batch, step) -> (trainable, opt_state,
    metrics)`` with explicit shardings, donated state and optional gradient accumulation."""
    cfg, model, tx = run.cfg, run.model, run.tx
    loss_cfg = build.loss_config(cfg)
    accum = cfg.train.grad_accum
    key = jax.random.key(cfg.seed)
    lr = optim.poly_lr(build.optim_config(cfg))

    def loss_fn(trainable, frozen, images, labels, rng):
        params = optim.merge_trees(trainable, frozen)
        outputs = model.apply({"params": params}, images, train=True)
        return segmentation_loss(outputs, labels, rng, loss_cfg)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulated_grad_fn(trainable, frozen, images, labels, rng):
        """Mean of ``grad_fn`` over ``accum`` micro-batches, one alive at a time."""
        micro = [x.reshape(accum, -1, *x.shape[1:]) for x in (images, labels)]

        def body(total, xs):
            i, im, lb = xs
            out = grad_fn(trainable, frozen, im, lb, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, total, out), None

        shapes = jax.eval_shape(grad_fn, trainable, frozen, micro[0][0], micro[1][0], rng)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum), *micro))
        return jax.tree.map(lambda x: x / accum, total)

    compute_grads = grad_fn if accum == 1 else accumulated_grad_fn

    def step_fn(trainable, opt_state, frozen, batch, step):
        rng = jax.random.fold_in(key, step)
        (loss, terms), grads = compute_grads(trainable, frozen, batch["image"], batch["label"], rng)
        updates, new_opt_state = tx.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        # A non-finite loss must not reach the parameters: keep the last good state (the
        # inputs are donated, so the host could not restore them afterwards).
        finite = jnp.isfinite(loss)
        trainable, opt_state = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old),
            (new_trainable, new_opt_state),
            (trainable, opt_state),
        )
        metrics = {"loss": loss, **terms, "lr": lr(step), "grad_norm": optax.tree.norm(grads)}
        return trainable, opt_state, metrics

    mesh = run.mesh
    state_sh = (tree_shardings(mesh, run.trainable), opt_state_shardings(run), None)
    return jax.jit(
        step_fn,
        in_shardings=(*state_sh[:2], tree_shardings(mesh, run.frozen), None, replicated(mesh)),
        out_shardings=(*state_sh[:2], replicated(mesh)),
        donate_argnums=(0, 1),
    )


def opt_state_shardings(run: Run) -> Any:
    """Optimizer state split like the parameters it mirrors (FSDP rule), scalars replicated."""
    return tree_shardings(run.mesh, jax.eval_shape(run.tx.init, run.trainable))


def init_opt_state(run: Run) -> Any:
    return jax.jit(run.tx.init, out_shardings=opt_state_shardings(run))(run.trainable)


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


def train(
    cfg: ml_collections.ConfigDict,
    workdir: str | Path,
    evaluate_fn: Callable[[Run, Params, int], dict] | None = None,
) -> dict:
    """Train to ``cfg.train.steps``, resuming from the latest checkpoint in ``workdir``.
    Returns the last logged metrics (and evaluation results, if any)."""
    problems = check_config(cfg) + (check_eval(cfg) if evaluate_fn else [])
    if problems:
        raise ConfigError("bad config:\n  " + "\n  ".join(problems))
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    run = build_run(cfg, workdir)
    t = cfg.train
    local_batch = check_batch_size(t.batch_size, run.mesh)
    ckpt = Checkpointer(workdir / "checkpoints", keep=t.keep_checkpoints)
    opt_state = init_opt_state(run)
    # A copy: the step donates (and so deletes) the trainable buffers.
    ema = jax.tree.map(jnp.copy, run.trainable) if cfg.optim.ema_momentum else None
    loader = make_train_loader(
        [Source(b, s, _data_dir(cfg, d), n) for b, s, n, d in _sources(cfg)],
        batch_size=local_batch,
        crop_size=(cfg.data.crop_size, cfg.data.crop_size),
        pad_raw=cfg.data.get("pad_raw", False),  # configs written before the option: off
        seed=cfg.seed,
        num_workers=cfg.data.workers,
    )
    batches = iter(loader)
    start = 0
    base = fingerprint(run.frozen)
    if ckpt.latest_step() is not None:
        state = {"tx": opt_state, "ema": ema}
        restored = ckpt.restore(abstract_like(run.trainable), abstract_like(state))
        check_base(
            restored.meta,
            base,
            cfg.model.backbone.weights,
            ckpt.directory / str(restored.step),
            allow=t.allow_other_base,
        )
        run.trainable = restored.trainable
        opt_state, ema = restored.opt_state["tx"], restored.opt_state["ema"]
        batches.set_state(restored.data_iter["state"].encode())
        start = restored.step
        log.info("resumed from step %d in %s", start, ckpt.directory)
    step_fn = make_step_fn(run)
    meta = {
        "config": json.loads(cfg.to_json_best_effort()),
        "base_weights": cfg.model.backbone.weights,
        "base_fingerprint": base,
    }
    metrics_log = MetricsLog(workdir, enabled=jax.process_index() == 0, resume_step=start)
    preemption = _Preemption()

    def save(step: int) -> None:
        ckpt.save(
            step,
            trainable=run.trainable,
            opt_state={"tx": opt_state, "ema": ema},
            rng=jax.random.key(cfg.seed),
            data_iter={"state": batches.get_state().decode()},
            meta=meta,
        )

    last: dict = {}
    bar = tqdm(
        range(start, t.steps),
        initial=start,
        total=t.steps,
        desc="train",
        disable=jax.process_index() != 0,
    )
    tick = time.perf_counter()
    try:
        for step in bar:
            batch = global_batch(next(batches), run.mesh)
            run.trainable, opt_state, metrics = step_fn(
                run.trainable, opt_state, run.frozen, batch, jnp.int32(step)
            )
            if not math.isfinite(float(metrics["loss"])):
                raise NonFiniteLossError(
                    f"loss is {float(metrics['loss'])} at step {step + 1}; stopped with the "
                    f"state of step {step} checkpointed in {ckpt.directory}"
                )
            if ema is not None:
                ema = optim.ema_update(
                    ema, run.trainable, step, cfg.optim.ema_momentum, cfg.optim.ema_start
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
            due_eval = evaluate_fn and (done % t.eval_every == 0 or done == t.steps)
            # Saved before evaluating: a failing or killed evaluation loses no training.
            if (
                done % t.checkpoint_every == 0
                or done == t.steps
                or due_eval
                or preemption.requested
            ):
                save(done)
            if due_eval and not preemption.requested:
                try:
                    results = evaluate_fn(run, _eval_params(run, ema), done)
                except Exception as err:  # the checkpoint of this step is saved
                    if done == t.steps:
                        raise EvaluationError(
                            f"the final evaluation (step {done}) failed: {err}; the trained "
                            f"state is checkpointed in {ckpt.directory}"
                        ) from err
                    log.exception("evaluation at step %d failed; training continues", done)
                else:
                    metrics_log.write(
                        done, {"miou": results["miou"], "mean_miou": results["mean_miou"]}
                    )
                    last = {**last, **results}
            if preemption.requested:
                if ckpt.latest_step() != done:
                    save(done)
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


def _eval_params(run: Run, ema: Params | None) -> Params:
    """Full params for evaluation: EMA weights where the recipe keeps them (SoMA)."""
    return optim.merge_trees(ema if ema is not None else run.trainable, run.frozen)


def _sources(cfg: ml_collections.ConfigDict) -> list[tuple]:
    """``data.sources`` entries as (builder, split, subset, data_dir or "")."""
    return [tuple(s) + ("",) * (4 - len(s)) for s in cfg.data.sources]


def _data_dir(cfg: ml_collections.ConfigDict, own: str) -> str:
    return str(Path(own or cfg.data.data_dir).expanduser())
