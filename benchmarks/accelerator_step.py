"""The real training step timed on the local accelerator: images/s, achieved TFLOP/s, MFU.

The step is ``train.py``'s (``train.trainer.make_train_step``: RecycleLoRA 32 + 4 on every
linear layer, Mask2Former, the set loss, AdamW groups), bfloat16 compute on a GPU or TPU
(float32 on a CPU), data-parallel over every local device. Achieved FLOP/s use the analytic
model FLOPs of ``models.flops`` (the preflight's), MFU the chip's published dense bf16 peak.
On a CPU the PyTorch reference of ``benchmarks/train_step.py`` (transformers modules) runs too;
it has no GPU/TPU path yet.

    python benchmarks/accelerator_step.py                  # ViT-S, B, L at 512 px, < 8 min
    python benchmarks/accelerator_step.py --sizes tiny     # seconds, exercises it on a CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from quiet import check_load

from recyclelora_jax.config import base_config, smoke
from recyclelora_jax.preflight import TPU_CHIPS, model_flops
from recyclelora_jax.train.sharding import global_batch, make_mesh
from recyclelora_jax.train.trainer import initial_train_state, make_train_step

# Dense bf16 peak FLOP/s per GPU, by a substring of `device_kind`.
GPU_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12}
TPU_KINDS = {"v4": "v4", "v5 lite": "v5e", "v5e": "v5e", "v5p": "v5p", "v6": "v6e"}
SIZES = ("tiny", "s", "b", "l")


def chip_peak(device: jax.Device) -> float | None:
    kind = device.device_kind
    if device.platform == "tpu":
        chip = next((c for k, c in TPU_KINDS.items() if k in kind.lower()), None)
        return TPU_CHIPS[chip].bf16_flops if chip else None
    return next((p for k, p in GPU_PEAKS.items() if k in kind), None)


def config(size: str, per_device: int, accelerator: bool):
    c = base_config()
    if size == "tiny":
        smoke(c)
    else:
        c.model.backbone.update(arch=f"vit{size}14")
        if size != "l":  # the recipe's blocks are ViT-L's; quarter ends for S/B
            c.model.backbone.out_indices = (2, 5, 8, 11)
    if accelerator:
        c.model.backbone.dtype = "bfloat16"
    c.train.batch_size = per_device * jax.device_count()
    return c


def time_size(size: str, args: argparse.Namespace) -> dict:
    device = jax.devices()[0]
    cfg = config(size, args.per_device_batch, device.platform != "cpu")
    mesh = make_mesh(**cfg.mesh)
    with tempfile.TemporaryDirectory() as tmp:
        setup, state, frozen, abstract = initial_train_state(cfg, Path(tmp), mesh)
    crop, n = cfg.data.crop_size, cfg.train.batch_size
    rng = np.random.default_rng(0)
    local = {
        "image": rng.standard_normal((n, crop, crop, 3), np.float32),
        "label": rng.integers(0, 19, (n, crop, crop)).astype(np.int32),
    }
    batch = global_batch(local, mesh)
    start = time.perf_counter()
    compiled = make_train_step(setup, abstract, frozen).lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - start
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        loss = float(metrics["loss"])  # waits for the step
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    f = model_flops(cfg, setup)
    flops = (f["backbone"] + f["head"] + f["loss"]).train * n
    peak = chip_peak(device)
    achieved = flops / seconds / jax.device_count()
    return {
        "size": size,
        "device": device.device_kind,
        "devices": jax.device_count(),
        "dtype": cfg.model.backbone.dtype,
        "seconds": seconds,
        "images_per_s_per_device": n / seconds / jax.device_count(),
        "tflops_per_device": achieved / 1e12,
        "mfu": achieved / peak if peak else None,
        "compile_s": compile_s,
        "loss": loss,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="s,b,l", help=f"comma list of {', '.join(SIZES)}")
    p.add_argument("--per-device-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--allow-loaded", action="store_true", help="CPU: run (flagged) when busy")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    sizes = args.sizes.split(",")
    if set(sizes) - set(SIZES):
        p.error(f"--sizes: unknown {sorted(set(sizes) - set(SIZES))}")
    if jax.devices()[0].platform == "cpu":
        check_load(args.allow_loaded)
    rows = [time_size(s, args) for s in sizes]
    print(f"jax {jax.__version__}; {rows[0]['devices']} x {rows[0]['device']}")
    print("| size | dtype | s/step | img/s/device | TFLOP/s/device | MFU | compile s | loss |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        print(
            f"| {r['size']} | {r['dtype']} | {r['seconds']:.3f} | "
            f"{r['images_per_s_per_device']:.2f} | {r['tflops_per_device']:.2f} | {mfu} | "
            f"{r['compile_s']:.0f} | {r['loss']:.2f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
