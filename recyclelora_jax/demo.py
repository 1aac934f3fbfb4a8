"""The demo: the real workflow at toy scale, on this machine, in minutes.

1. Write the synthetic domain-shift scenes in the GTAV and Cityscapes layouts and build them
   with the real TFDS builders (once; cached under ``demo.data_dir``).
2. Obtain a "foundation" ViT: the user's converted DINOv2 when ``model.backbone.weights`` is
   set, else a small DINOv2-architecture ViT pretrained by dense contrast across photometric
   views on unlabelled images of every style (cached in the workdir) -- no weights can be
   downloaded here.
3. Compare ``demo.methods`` over ``demo.seeds`` (``recyclelora_jax.compare``): each run freezes
   it, attaches the method's adapters and trains on the "synthetic" style only, then evaluates on
   held-out synthetic images (source) and on the unseen styles (targets); the comparison gives
   every method's mean ± std and its paired difference to ``demo.baseline`` with a 95 % interval.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from recyclelora_jax import compare
from recyclelora_jax.build import backbone_module, config_arch
from recyclelora_jax.convert import save_converted
from recyclelora_jax.data import codecs
from recyclelora_jax.data.pipeline import MixedSource, Source
from recyclelora_jax.data.synthetic import prepare_synthetic_once
from recyclelora_jax.pretrain import native_crops, pretrain_contrastive


def prepare_data(d: ml_collections.ConfigDict) -> Path:
    """Synthetic datasets, written and built once."""
    return prepare_synthetic_once(
        d.raw_dir,
        d.data_dir,
        num_train=d.num_train,
        num_val=d.num_val,
        size=tuple(d.image_size),
        seed=d.seed,
    )


def foundation_weights(cfg: ml_collections.ConfigDict, workdir: Path) -> Path:
    """Style-invariant pretraining of the stand-in backbone on every style's train images."""
    file = workdir / "foundation.safetensors"
    if file.exists():
        return file
    d = cfg.demo
    # The config's own backbone, with the input normalisation its segmentor applies.
    backbone = backbone_module(cfg, config_arch(cfg)).clone(
        input_norm=cfg.model.backbone.input_norm
    )
    # Every style's unlabelled train images, cropped at their stored scale (the scale every
    # evaluation reads them at), never through train.py's scale jitter.
    data = MixedSource(
        [
            Source(builder, split, str(Path(d.data_dir) / name))
            for name, builder, split in d.pretrain_sources
        ],
        cfg.seed,
    )
    records = (data[i] for i in range(len(data)))
    raw = np.stack([codecs.decode_image(r["image"], r["file_name"]) for r in records])
    images = native_crops(raw, d.pretrain_crop, d.pretrain_batch, cfg.seed)
    params = pretrain_contrastive(
        backbone,
        images,
        steps=d.pretrain_steps,
        lr=d.pretrain_lr,
        every_block=d.pretrain_every_block,
        seed=cfg.seed,
    )
    workdir.mkdir(parents=True, exist_ok=True)
    save_converted(file, backbone, params)  # atomic: safetensors_file writes, then renames
    return file


def run_demo(
    cfg: ml_collections.ConfigDict, config: str, overrides: Mapping[str, Any], workdir: Path
) -> dict:
    """Prepare the data and the foundation model, then run the comparison of ``demo.methods``
    over ``demo.seeds``. ``config`` is the config file argument (``path[:args]``) and
    ``overrides`` the ``{"a.b": value}`` overrides ``cfg`` was made from: each run's config is
    that file with ``method=``, ``seed=`` and the overrides. Returns the comparison."""
    workdir = Path(workdir)
    compare.use_compile_cache(workdir)  # before the first compile: the pretraining's
    prepare_data(cfg.demo)
    overrides = dict(overrides)
    if not cfg.model.backbone.weights:
        overrides["model.backbone.weights"] = str(foundation_weights(cfg, workdir))
    d = cfg.demo
    results = compare.compare(config, overrides, d.methods, d.seeds, workdir, d.baseline)
    shown = compare.run_dir(workdir, d.methods[0], d.seeds[0]) / compare.PREDICTIONS
    shutil.copyfile(shown, workdir / compare.PREDICTIONS)
    return results
