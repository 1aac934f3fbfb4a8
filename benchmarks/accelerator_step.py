"""The real training step timed on the local accelerator: images/s, achieved TFLOP/s, MFU.

JAX: ``train.py``'s step (``train.trainer.make_train_step``: RecycleLoRA 32 + 4 on every linear
layer, Mask2Former, the set loss, AdamW groups), bfloat16 compute on a GPU or TPU (float32 on a
CPU), data-parallel over every local device. PyTorch: the reference of ``benchmarks/
train_step.py`` (transformers' DINOv2 and Mask2Former modules with the same adapters, loss and
AdamW groups) on one device of the same kind where torch has one: CUDA on a GPU machine
(backbone and head under bfloat16 autocast, the set loss in float32, as the JAX step's loss
reductions), the CPU on a CPU (float32); torch has no TPU device here (no torch_xla), so on a
TPU its rows say so. Both use the same batch per device and the same analytic model FLOPs
(``models.flops``, the preflight's), so images/s, TFLOP/s and MFU (against the chip's published
dense bf16 peak) compare per device. Each (framework, size) runs in its own process, so
neither holds the other's device memory.

    python benchmarks/accelerator_step.py                  # ViT-S, B, L at 512 px, < 8 min
    python benchmarks/accelerator_step.py --sizes tiny     # seconds, exercises JAX on a CPU
    python benchmarks/accelerator_step.py --sizes s --crop 64 --steps 1 --allow-loaded
                                                           # both frameworks, small, on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from quiet import check_load, run_child

# Dense bf16 peak FLOP/s per GPU, by a substring of `device_kind`.
GPU_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12}
TPU_KINDS = {"v4": "v4", "v5 lite": "v5e", "v5e": "v5e", "v5p": "v5p", "v6": "v6e"}
SIZES = ("tiny", "s", "b", "l")


def chip_peak(platform: str, kind: str) -> float | None:
    from recyclelora_jax.preflight import TPU_CHIPS

    if platform == "tpu":
        chip = next((c for k, c in TPU_KINDS.items() if k in kind.lower()), None)
        return TPU_CHIPS[chip].bf16_flops if chip else None
    return next((p for k, p in GPU_PEAKS.items() if k in kind), None)


def config(size: str, args: argparse.Namespace, devices: int, accelerator: bool):
    from recyclelora_jax.config import base_config, smoke

    c = base_config()
    if size == "tiny":
        smoke(c)
    else:
        c.model.backbone.update(arch=f"vit{size}14")
        if size != "l":  # the recipe's blocks are ViT-L's; quarter ends for S/B
            c.model.backbone.out_indices = (2, 5, 8, 11)
        c.data.crop_size = args.crop
    if accelerator:
        c.model.backbone.dtype = "bfloat16"
    c.train.batch_size = args.per_device_batch * devices
    return c


def time_jax(size: str, args: argparse.Namespace) -> dict:
    import jax
    import numpy as np

    from recyclelora_jax.preflight import model_flops
    from recyclelora_jax.train.sharding import global_batch, make_mesh
    from recyclelora_jax.train.trainer import initial_train_state, make_train_step

    device = jax.devices()[0]
    cfg = config(size, args, jax.device_count(), device.platform != "cpu")
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
    f = model_flops(cfg, setup)
    return {
        "platform": device.platform,
        "device": device.device_kind,
        "devices": jax.device_count(),
        "dtype": cfg.model.backbone.dtype,
        "seconds": statistics.median(times),
        "images_per_device": args.per_device_batch,
        "flops_per_image": (f["backbone"] + f["head"] + f["loss"]).train,
        "compile_s": compile_s,
        "loss": loss,
        "version": f"jax {jax.__version__}",
    }


def time_torch(size: str, args: argparse.Namespace) -> dict:
    """The reference step on one CUDA device, else on the CPU (``args.platform`` says which
    the JAX child found; a TPU gives no row)."""
    import torch
    import transformers
    from step_builders import schedule, timed_steps, torch_step

    if args.platform == "tpu":
        return {"error": "no torch device for a TPU (torch_xla is not installed)"}
    if args.platform == "gpu" and not torch.cuda.is_available():
        return {"error": "torch has no CUDA device here"}
    device = "cuda" if args.platform == "gpu" else "cpu"
    build = argparse.Namespace(threads=os.cpu_count(), crop=args.crop, batch=args.per_device_batch)
    ref = torch_step(size, build)
    for module in (ref.backbone, ref.head, ref.criterion):
        module.to(device)  # in place: the optimizer keeps the same parameters
    ref.pixels, ref.labels = ref.pixels.to(device), ref.labels.to(device)
    count = {"i": 0}

    def step() -> float:
        schedule(ref.optimizer, count["i"])
        ref.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            masks, logits = ref.predictions(ref.maps())
        loss = ref.set_loss([m.float() for m in masks], [c.float() for c in logits])
        loss.backward()
        ref.optimizer.step()
        count["i"] += 1
        return loss.item()  # waits for the step

    times, loss = timed_steps(step, args.warmup, args.steps)
    return {
        "dtype": "bfloat16 autocast" if device == "cuda" else "float32",
        "seconds": statistics.median(times),
        "loss": loss,
        "version": f"torch {torch.__version__}, transformers {transformers.__version__}",
    }


def platform(_size: str, _args: argparse.Namespace) -> dict:
    """The local devices' platform, found in a child so that the parent starts no backend (a
    GPU backend would hold device memory that the timed children need)."""
    import jax

    return {"platform": jax.devices()[0].platform}


def rates(r: dict, jax_row: dict, peak: float | None) -> str:
    """``img/s/device | TFLOP/s/device | MFU`` of a row timed at the JAX row's batch."""
    images = jax_row["images_per_device"]
    achieved = jax_row["flops_per_image"] * images / r["seconds"]
    mfu = "-" if peak is None else f"{achieved / peak:.1%}"
    return f"{images / r['seconds']:.2f} | {achieved / 1e12:.2f} | {mfu}"


def table(rows: list[tuple[str, dict, dict]]) -> str:
    lines = [
        "| size | framework | dtype | s/step | img/s/device | TFLOP/s/device | MFU | "
        "compile s | loss |",
        "|---" * 9 + "|",
    ]
    for size, j, t in rows:
        if "error" in j:
            lines.append(f"| {size} | JAX | {j['error']} |")
            continue
        peak = chip_peak(j["platform"], j["device"])
        lines.append(
            f"| {size} | JAX | {j['dtype']} | {j['seconds']:.3f} | {rates(j, j, peak)} | "
            f"{j['compile_s']:.0f} | {j['loss']:.2f} |"
        )
        if "error" in t:
            lines.append(f"| {size} | PyTorch | {t['error']} |")
        else:
            lines.append(
                f"| {size} | PyTorch | {t['dtype']} | {t['seconds']:.3f} | "
                f"{rates(t, j, peak)} | eager | {t['loss']:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="s,b,l", help=f"comma list of {', '.join(SIZES)}")
    p.add_argument("--per-device-batch", type=int, default=4)
    p.add_argument("--crop", type=int, default=512, help="crop of ViT-S/B/L (tiny: its own 64)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-torch", action="store_true", help="time the JAX step only")
    p.add_argument("--allow-loaded", action="store_true", help="CPU: run (flagged) when busy")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--child", nargs=2, metavar=("FRAMEWORK", "SIZE"), help=argparse.SUPPRESS)
    p.add_argument("--platform", help=argparse.SUPPRESS)  # the JAX child's, for torch's
    args = p.parse_args()
    if args.child:
        framework, size = args.child
        run = {"jax": time_jax, "torch": time_torch, "platform": platform}[framework]
        print(json.dumps(run(size, args)))
        return
    sizes = args.sizes.split(",")
    if set(sizes) - set(SIZES):
        p.error(f"--sizes: unknown {sorted(set(sizes) - set(SIZES))}")
    argv = [a for a in sys.argv[1:] if a != "--no-torch"]
    if run_child(__file__, ["--child", "platform", "-"]).get("platform") == "cpu":
        check_load(args.allow_loaded)
    rows = []
    for size in sizes:
        j = run_child(__file__, [*argv, "--child", "jax", size])
        if "error" in j or args.no_torch or size == "tiny":
            t = {"error": "not run" if "error" in j or args.no_torch else "no reference at tiny"}
        else:
            t = run_child(__file__, [*argv, "--platform", j["platform"], "--child", "torch", size])
        rows.append((size, j, t))
        print(f"{size} done", file=sys.stderr)
    versions = sorted({r["version"] for _, j, t in rows for r in (j, t) if "version" in r})
    first = rows[0][1]
    if "devices" in first:
        print(f"{'; '.join(versions)}; {first['devices']} x {first['device']}")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(
            json.dumps([{"size": s, "jax": j, "torch": t} for s, j, t in rows], indent=1)
        )


if __name__ == "__main__":
    main()
