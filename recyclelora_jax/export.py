"""Trained runs as models: restore one from its workdir without the trainer (no optimizer, no
data pipeline), fold its adapters into the backbone, and save/load the self-contained inference
file (plain DINOv2 + head in one safetensors file, no adapter path)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import ml_collections

from recyclelora_jax import build, model_io, recipe
from recyclelora_jax.models.dinov2 import DinoV2, DinoV2Arch
from recyclelora_jax.models.segmentor import Segmentor
from recyclelora_jax.peft.params import merge
from recyclelora_jax.train.checkpoint import (
    OPT_STATE,
    Checkpointer,
    abstract_like,
    check_base,
    fingerprint,
)

Params = dict[str, Any]
FORMAT_TAG = "recyclelora_jax.segmentor"


def stored_config(meta: dict, where: Path) -> ml_collections.ConfigDict:
    """The config a checkpoint was trained with. Checkpoints from before the recipe tables
    (1 Dec 2026, commit f945239: a ``peft`` section instead of ``adapters``/``params``/
    ``groups``) cannot be rebuilt by this version: refused by name, not with a KeyError."""
    stored = meta["config"]
    if "adapters" not in stored and "peft" in stored:
        raise ValueError(
            f"{where} was written before the recipe tables (its config has a 'peft' section, "
            "no 'adapters'/'params'/'groups'), which this version cannot rebuild; evaluate or "
            "export it with the version that wrote it (git checkout f945239~1), or retrain"
        )
    return ml_collections.ConfigDict(stored)


def restore_run(
    workdir: str | Path, step: int | None = None, *, allow_other_base: bool = False
) -> tuple[Segmentor, Params, ml_collections.ConfigDict]:
    """(adapter model, full params, config) of a training checkpoint: the config stored in the
    checkpoint rebuilds the frozen base (its weights pointer, the cached adapter init), verified
    against the checkpoint's fingerprint of it, then the ``trainable`` item is restored over it
    -- the EMA weights where the recipe keeps them."""
    ckpt = Checkpointer(Path(workdir) / "checkpoints", async_save=False, create=False)
    try:
        meta = ckpt.read_meta(step)
        cfg = stored_config(meta, ckpt.directory)
        backbone, base = build.load_backbone_weights(cfg, cfg.seed)
        model, params = build.init_params(cfg, backbone, base, Path(workdir))
        part = recipe.partition(cfg, backbone.arch, params)
        trainable, frozen = part.trainable, part.frozen
        where = ckpt.directory / str(step if step is not None else ckpt.latest_step())
        base_file = cfg.model.backbone.weights
        check_base(meta, fingerprint(frozen), base_file, where, allow=allow_other_base)
        if cfg.optim.ema_momentum:
            trainable = ckpt.read_item(OPT_STATE, step)["ema"]
        else:
            trainable = ckpt.restore(abstract_like(trainable), step=step).trainable
    finally:
        ckpt.close()
    return model, recipe.merge_trees(trainable, frozen), cfg


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
    model_io.save_tree(path, params, meta)


def load_export(path: str | Path) -> tuple[Segmentor, Params, ml_collections.ConfigDict]:
    """(plain model, params, config) of a file written by `save_export`."""
    params, meta = model_io.load_tree(path, FORMAT_TAG)
    cfg = ml_collections.ConfigDict(json.loads(meta["config"]))
    extra = json.loads(meta["backbone"])
    backbone = DinoV2(
        DinoV2Arch(**json.loads(meta["arch"])),
        out_indices=tuple(extra["out_indices"]),
        interpolate_offset=extra["interpolate_offset"],
        interpolate_antialias=extra["interpolate_antialias"],
    )
    return build.build_segmentor(cfg, backbone), params, cfg
