"""Full training step speed: this project's jitted step vs a PyTorch reference from transformers.

One step = DINOv2 backbone (patch 16, 32x32 position grid, random frozen weights) with RecycleLoRA
adapters (main rank 32 + sub rank 4) on every qkv/proj/fc1/fc2 + Mask2Former head + the
Mask2Former set loss over all 10 prediction sets + AdamW (poly LR, cosine weight decay, four
parameter groups) on the trainable leaves only; 512-px crops, float32.

JAX: the package's own step (``train.trainer.initial_train_state`` / ``make_train_step``), so
what is timed is what ``train.py`` runs. PyTorch: ``transformers.Dinov2Model`` with the same
adapters (the qkv adapter is shared by q/k/v as on the fused kernel), the bilinear pyramid,
transformers' ``Mask2FormerPixelDecoder`` + ``Mask2FormerTransformerModule`` + class Linear,
``Mask2FormerLoss`` with the recipe's weights and point sampling, ``torch.optim.AdamW``.

Each (size, framework) runs in its own child process on the same pinned cores (peak RSS is its
own; the JAX child re-executes with glibc's huge-page tunable as ``train.py`` does,
``RECYCLELORA_HUGEPAGES=0`` turns that off); the parent prints a markdown table with torch / JAX
time ratios.

    python benchmarks/train_step.py                      # ViT-S and ViT-B, 2 timed steps
    python benchmarks/train_step.py --sizes l --steps 1 --remat  # ViT-L in less memory
    python benchmarks/train_step.py --sizes s --scan     # scanned, recomputed layers: least memory
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

from quiet import QUIET, check_load, run_child
from step_builders import (
    add_step_args,
    check_step_args,
    jax_state,
    schedule,
    timed_steps,
    torch_step,
)

from recyclelora_jax import hugepages


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_step_args(p)
    p.add_argument("--steps", type=int, default=2, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    p.add_argument("--child", nargs=2, metavar=("FRAMEWORK", "SIZE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    check_step_args(p, args)
    return args


# ----------------------------------------------------------------------------------------- JAX


def run_jax(size: str, args: argparse.Namespace) -> dict:
    import jax

    from recyclelora_jax.train.trainer import make_train_step

    setup, init, frozen, abstract, batch, build_s = jax_state(size, args)
    start = time.perf_counter()
    compiled = make_train_step(setup, abstract, frozen).lower(init, frozen, batch).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    state = {"run": init}

    def step() -> float:
        state["run"], metrics = compiled(state["run"], frozen, batch)
        return float(metrics["loss"])  # waits for the step

    times, loss = timed_steps(step, args.warmup, args.steps)
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
    return {
        "times": times,
        "loss": loss,
        "compile_s": compile_s,
        "build_s": build_s,
        "trainable": count(state["run"]["trainable"]),
        "xla_temp_gib": mem.temp_size_in_bytes / 2**30 if mem else float("nan"),
        "version": f"jax {jax.__version__}",
    }


# ------------------------------------------------------------------------------------- PyTorch


def run_torch(size: str, args: argparse.Namespace) -> dict:
    import torch
    import transformers

    ref = torch_step(size, args)
    count = {"i": 0}

    def step() -> float:
        schedule(ref.optimizer, count["i"])
        ref.optimizer.zero_grad(set_to_none=True)
        loss = ref.loss()
        loss.backward()
        ref.optimizer.step()
        count["i"] += 1
        return loss.item()

    times, loss = timed_steps(step, args.warmup, args.steps)
    return {
        "times": times,
        "loss": loss,
        "trainable": ref.trainable(),
        "version": f"torch {torch.__version__}, transformers {transformers.__version__}",
    }


# --------------------------------------------------------------------------------------- driver


def child(args: argparse.Namespace) -> None:
    framework, size = args.child
    if framework == "jax":
        hugepages.reexec_with_huge_pages()  # what train.py does
    result = (run_jax if framework == "jax" else run_torch)(size, args)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(result))


def row(size: str, args: argparse.Namespace, j: dict, t: dict) -> str:
    if "error" in j or "error" in t:
        return (
            f"| ViT-{size.upper()} | JAX: {j.get('error', 'ok')}, torch: {t.get('error', 'ok')} |"
        )
    js, ts = statistics.median(j["times"]), statistics.median(t["times"])
    return (
        f"| ViT-{size.upper()} | {args.steps} | {js:.2f} | {ts:.2f} | {ts / js:.2f} | "
        f"{args.batch / js:.3f} | {args.batch / ts:.3f} | {j['compile_s']:.0f} | "
        f"{j['peak_rss_gib']:.1f} | {t['peak_rss_gib']:.1f} | {j['xla_temp_gib']:.1f} | "
        f"{j['trainable'] / 1e6:.2f} / {t['trainable'] / 1e6:.2f} | "
        f"{j['loss']:.1f} / {t['loss']:.1f} |"
    )


def main() -> None:
    args = parse_args()
    # Same cores for both, chosen before either library sizes its thread pools.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    if args.child:
        child(args)
        return
    start_load = check_load(args.allow_loaded)
    argv = sys.argv[1:]
    lines, versions = [], {}
    for size in args.sizes.split(","):
        load = os.getloadavg()[0]
        j, t = (run_child(__file__, [*argv, "--child", f, size]) for f in ("jax", "torch"))
        versions.update({k: r["version"] for k, r in (("jax", j), ("torch", t)) if "version" in r})
        lines.append(row(size, args, j, t))
        print(
            f"ViT-{size.upper()} done (load average {load:.1f} before, "
            f"{os.getloadavg()[0]:.1f} after)",
            file=sys.stderr,
        )
    print(
        f"{platform.machine()}, {args.threads} threads; {'; '.join(versions.values())}; "
        f"batch {args.batch}, {args.crop} px, float32, median of {args.steps} after "
        f"{args.warmup} warm-up; JAX backbone remat: {args.remat}, scanned layers: {args.scan}; "
        f"one-minute load average {start_load:.1f} at start"
        f"{' (LOADED)' if start_load >= QUIET else ''}"
    )
    print(
        "| model | steps | JAX s/step | torch s/step | torch / JAX | JAX img/s | torch img/s | "
        "JAX compile s | peak RSS JAX GiB | peak RSS torch GiB | XLA temp GiB | "
        "trainable M (JAX / torch) | last loss (JAX / torch) |"
    )
    print("|---" * 13 + "|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
