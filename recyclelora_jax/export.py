"""Restore a trained run, fold its adapters into the backbone, and save/load a self-contained
inference checkpoint (plain DINOv2 + head, one safetensors file, no adapter path: SPEC §2)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from recyclelora_jax import build, safetensors_file
from recyclelora_jax.models.dinov2 import DinoV2, DinoV2Arch
from recyclelora_jax.models.segmentor import Segmentor
from recyclelora_jax.peft.params import merge
from recyclelora_jax.train import optim
from recyclelora_jax.train.checkpoint import Checkpointer, abstract_like, check_base, fingerprint
from recyclelora_jax.train.loop import build_run

Params = dict[str, Any]
FORMAT_TAG = "recyclelora_jax.segmentor"


def load_trained(
    workdir: str | Path, step: int | None = None, *, allow_other_base: bool = False
) -> tuple[Segmentor, Params, ml_collections.ConfigDict]:
    """(adapter model, full params, config) of a training checkpoint: the config stored in the
    checkpoint rebuilds the frozen base (its weights pointer, the cached init), verified against
    the checkpoint's fingerprint of it, then the trained leaves are restored over it -- EMA
    weights where the recipe keeps them."""
    workdir = Path(workdir)
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False, create=False)
    try:
        meta = ckpt.read_meta(step)
        cfg = ml_collections.ConfigDict(meta["config"])
        run = build_run(cfg, workdir)
        where = ckpt.directory / str(step if step is not None else ckpt.latest_step())
        base = cfg.model.backbone.weights
        check_base(meta, fingerprint(run.frozen), base, where, allow=allow_other_base)
        if cfg.optim.ema_momentum:
            state = {"tx": jax.eval_shape(run.tx.init, run.trainable), "ema": run.trainable}
            restored = ckpt.restore(abstract_like(run.trainable), abstract_like(state), step=step)
            trainable = restored.opt_state["ema"]
        else:
            trainable = ckpt.restore(abstract_like(run.trainable), step=step).trainable
    finally:
        ckpt.close()
    return run.model, optim.merge_trees(trainable, run.frozen), cfg


def merge_segmentor(model: Segmentor, params: Params) -> tuple[Segmentor, Params]:
    """The same function without adapters: every ``a @ b`` folded into its kernel."""
    plain = model.clone(backbone=model.backbone.clone(adapters=()))
    return plain, {**params, "backbone": merge(params["backbone"], model.backbone.adapters)}


def save_export(
    path: str | Path, model: Segmentor, params: Params, cfg: ml_collections.ConfigDict
) -> None:
    """One safetensors file: merged params under ``backbone/…``/``head/…`` and, as metadata, the
    config and the backbone's architecture. Written to a temporary name, then renamed."""
    if model.backbone.adapters:
        model, params = merge_segmentor(model, params)
    b = model.backbone
    meta = {
        "format": FORMAT_TAG,
        "config": cfg.to_json_best_effort(),
        "arch": json.dumps(dataclasses.asdict(b.arch)),
        "backbone": json.dumps(
            {
                "out_indices": list(b.out_indices),
                "interpolate_offset": b.interpolate_offset,
                "interpolate_antialias": b.interpolate_antialias,
            }
        ),
    }
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    safetensors_file.save(path, {k: np.asarray(v) for k, v in flat.items()}, meta)


def load_export(path: str | Path) -> tuple[Segmentor, Params, ml_collections.ConfigDict]:
    """(plain model, params, config) of a file written by `save_export`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no exported model at {path}")
    meta = safetensors_file.metadata(path)
    if meta.get("format") != FORMAT_TAG:
        raise ValueError(f"{path} is not a recyclelora_jax export (metadata {sorted(meta)})")
    cfg = ml_collections.ConfigDict(json.loads(meta["config"]))
    extra = json.loads(meta["backbone"])
    backbone = DinoV2(
        DinoV2Arch(**json.loads(meta["arch"])),
        out_indices=tuple(extra["out_indices"]),
        interpolate_offset=extra["interpolate_offset"],
        interpolate_antialias=extra["interpolate_antialias"],
    )
    params = traverse_util.unflatten_dict(safetensors_file.load(path)[0], sep="/")
    return build.build_segmentor(cfg, backbone), params, cfg
