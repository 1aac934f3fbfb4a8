"""The demo: the real workflow at toy scale, on this machine, in minutes.

1. Write the synthetic domain-shift scenes in the GTAV and Cityscapes layouts and build them
   with the real TFDS builders (once; cached under ``demo.data_dir``).
2. Obtain a "foundation" ViT: the user's converted DINOv2 when ``model.backbone.weights`` is
   set, else a small DINOv2-architecture ViT pretrained by dense contrast across photometric
   views on unlabelled images of every style (cached in the workdir) -- no weights can be
   downloaded here.
3. Freeze it, attach RecycleLoRA with the RRQR init, train on the "synthetic" style only.
4. Evaluate on held-out synthetic images (source) and on the unseen styles (targets), then the
   same for the baselines (frozen backbone, plain LoRA), and print one comparison table.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import ml_collections
import numpy as np

from recyclelora_jax.build import arch_from_name
from recyclelora_jax.config import apply_method
from recyclelora_jax.convert import save_converted
from recyclelora_jax.data.pipeline import Source, make_train_loader
from recyclelora_jax.data.synthetic import prepare_synthetic_once
from recyclelora_jax.models.dinov2 import DinoV2
from recyclelora_jax.pretrain import pretrain_contrastive
from recyclelora_jax.runner import make_evaluator
from recyclelora_jax.train.trainer import train

log = logging.getLogger(__name__)


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
    b, d = cfg.model.backbone, cfg.demo
    arch = arch_from_name(b.arch)
    backbone = DinoV2(arch, out_indices=tuple(b.out_indices))
    loader = make_train_loader(
        [
            Source(builder, split, str(Path(d.data_dir) / name))
            for name, builder, split in d.pretrain_sources
        ],
        batch_size=d.pretrain_batch,
        crop_size=(d.pretrain_crop, d.pretrain_crop),
        seed=cfg.seed,
    )
    images = (batch["image"] for batch in loader)
    params = pretrain_contrastive(
        backbone, images, steps=d.pretrain_steps, lr=d.pretrain_lr, seed=cfg.seed
    )
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    save_converted(tmp, backbone, params)
    tmp.replace(file)
    return file


def comparison_table(results: dict[str, dict]) -> str:
    """Methods as rows, datasets as columns (mIoU %), plus the target mean."""
    first = next(iter(results.values()))
    names = list(first["miou"])
    head = f"{'method':<14}" + "".join(f"{n:>16}" for n in names) + f"{'target mean':>14}"
    lines = [head, "-" * len(head)]
    for method, r in results.items():
        targets = [r["miou"][n] for n in names[1:]]
        cells = "".join(f"{r['miou'][n]:>16.2f}" for n in names)
        lines.append(f"{method:<14}{cells}{np.mean(targets):>14.2f}")
    return "\n".join(lines)


def run_demo(cfg: ml_collections.ConfigDict, workdir: Path) -> dict:
    """Prepare the data and the foundation model, train and evaluate RecycleLoRA and each of
    ``cfg.demo.baselines`` (one ``train()`` run each), print and save the comparison."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())  # an unlocked copy
    workdir = Path(workdir)
    prepare_data(cfg.demo)
    if not cfg.model.backbone.weights:
        cfg.model.backbone.weights = str(foundation_weights(cfg, workdir))
    results = {}
    for method in ("recyclelora", *cfg.demo.baselines):
        sub = apply_method(ml_collections.ConfigDict(cfg.to_dict()), method)
        png = workdir / "predictions.png" if method == "recyclelora" else None
        log.info("=== %s ===", method)
        results[method] = train(
            sub, workdir / method, make_evaluator(sub, png, cfg.demo.png_per_dataset)
        )
    table = comparison_table(results)
    if jax.process_index() == 0:
        print(f"\nmIoU (%) on held-out source images and unseen target styles:\n{table}")
        (workdir / "summary.txt").write_text(table + "\n")
    return results["recyclelora"]
