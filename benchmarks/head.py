"""Mask2Former head speed and memory: this project's Flax head vs transformers' PyTorch modules.

The reference configuration (RECIPE.md §4: 256-d, 8 heads, 6 deformable encoder layers, 9 decoder
layers, 100 queries, 19 classes) on the features of a 512-px image: four ViT-L maps
(B, 32, 32, 1024), resized to strides 4/8/16/32, then pixel decoder + transformer decoder + class
predictor. Forward+backward with respect to all head parameters of a scalar that touches every
prediction set. Random weights (speed only), float32. Each framework runs in its own child
process (so its peak RSS is its own); the parent prints one markdown row with the ratio.

    python benchmarks/head.py                     # batch 2, 2 threads, median of 3
    python benchmarks/head.py --remat             # deformable sampling recomputed in backward
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

from quiet import QUIET, check_load, time_calls

BATCH_DEFAULT, GRID, WIDTH, CLASSES = 2, 32, 1024, 19


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=BATCH_DEFAULT)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--remat", action="store_true", help="remat the deformable sampling (JAX)")
    p.add_argument("--allow-loaded", action="store_true", help="run (flagged) on a busy machine")
    p.add_argument("--only", choices=("jax", "torch"), help=argparse.SUPPRESS)
    return p.parse_args()


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp

    from recyclelora_jax.models.mask2former import Mask2FormerHead

    head = Mask2FormerHead(num_classes=CLASSES, remat=args.remat)
    key = jax.random.key(0)
    feats = [jax.random.normal(key, (args.batch, GRID, GRID, WIDTH))] * 4
    params = jax.jit(head.init)(key, feats)["params"]

    def scalar(p, f):
        out = head.apply({"params": p}, f, train=True)
        return sum(jnp.mean(v**2) for v in out.values())

    step = jax.jit(jax.grad(scalar))
    compiled = step.lower(params, feats).compile()
    mem = compiled.memory_analysis()
    first, runs, _ = time_calls(lambda: jax.block_until_ready(step(params, feats)), args.repeats)
    return {
        "first": first,
        "median": statistics.median(runs),
        "xla_temp_gib": mem.temp_size_in_bytes / 2**30 if mem else float("nan"),
        "version": f"jax {jax.__version__}",
    }


def run_torch(args) -> dict:
    import torch
    import transformers
    from transformers.models.mask2former import modeling_mask2former as hf

    torch.set_num_threads(args.threads)
    config = hf.Mask2FormerConfig(num_labels=CLASSES, feature_strides=[4, 8, 16, 32])
    pixel = hf.Mask2FormerPixelDecoder(config, feature_channels=[WIDTH] * 4).train()
    transformer = hf.Mask2FormerTransformerModule(config.feature_size, config).train()
    cls = torch.nn.Linear(config.hidden_dim, CLASSES + 1)
    with torch.no_grad():
        pixel.level_embed.normal_()  # created uninitialised outside a full model
    feats = [torch.randn(args.batch, WIDTH, GRID, GRID)] * 4
    scales = (4.0, 2.0, 1.0, 0.5)

    def step():
        pyramid = [
            torch.nn.functional.interpolate(f, scale_factor=s, mode="bilinear", align_corners=False)
            for f, s in zip(feats, scales, strict=True)
        ]
        out = pixel(pyramid)
        dec = transformer(out.multi_scale_features, out.mask_features)
        loss = sum((cls(h.transpose(0, 1)) ** 2).mean() for h in dec.intermediate_hidden_states)
        loss = loss + sum((m**2).mean() for m in dec.masks_queries_logits)
        loss.backward()

    first, runs, _ = time_calls(step, args.repeats)
    return {
        "first": first,
        "median": statistics.median(runs),
        "version": f"torch {torch.__version__}, transformers {transformers.__version__}",
    }


def child(args) -> None:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    result = run_jax(args) if args.only == "jax" else run_torch(args)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(result))


def main() -> None:
    args = parse_args()
    if args.only:
        child(args)
        return
    load = check_load(args.allow_loaded)
    results = {}
    for which in ("jax", "torch"):
        cmd = [sys.executable, __file__, "--only", which, *sys.argv[1:]]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[which] = json.loads(out.strip().splitlines()[-1])
    j, t = results["jax"], results["torch"]
    print(
        f"{j['version']}; {t['version']}; batch {args.batch}, {args.threads} threads, float32; "
        f"one-minute load average {load:.1f}{' (LOADED)' if load >= QUIET else ''}"
    )
    print(
        "| fwd+bwd JAX s | fwd+bwd torch s | JAX/torch | JAX compile+1st s | "
        "peak RSS JAX GiB | peak RSS torch GiB | XLA temp GiB | remat |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {j['median']:.2f} | {t['median']:.2f} | {j['median'] / t['median']:.2f} | "
        f"{j['first']:.1f} | {j['peak_rss_gib']:.2f} | {t['peak_rss_gib']:.2f} | "
        f"{j['xla_temp_gib']:.2f} | {args.remat} |"
    )


if __name__ == "__main__":
    main()
