"""RecycleLoRA initialisation of all ViT-L kernels: project vs the reference procedure.

Reference (as the released code does it): for each layer in turn, `scipy.linalg.qr(pivoting=True)`
once for the main adapter and once more for the sub adapter, dense `B @ A` products for the
residual. Project: `peft.params.attach` (one `jax.scipy.linalg.qr` per kernel serves both
adapters, one-hot scatter for the residual, layers on a thread pool). Random float32 kernels.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time

import jax
import numpy as np
import scipy
import scipy.linalg
from threadpoolctl import threadpool_limits

from recyclelora_jax.config import base_config
from recyclelora_jax.models.dinov2 import ARCHS, linear_layer_paths
from recyclelora_jax.peft.params import attach
from recyclelora_jax.recipe import attach_rules


def random_kernels(depth: int, seed: int = 0) -> dict:
    """A backbone-shaped tree holding only the adapted layers' kernels and biases."""
    arch = ARCHS["vitl14"]
    shapes = {"qkv": (1024, 3072), "proj": (1024, 1024), "fc1": (1024, 4096), "fc2": (4096, 1024)}
    rng = np.random.default_rng(seed)
    tree: dict = {}
    for path in linear_layer_paths(arch)[: 4 * depth]:
        block, group, name = path.split("/")
        kernel = (rng.standard_normal(shapes[name], np.float32) * 0.02).astype(np.float32)
        bias = np.zeros(shapes[name][1], np.float32)
        tree.setdefault(block, {}).setdefault(group, {})[name] = {"kernel": kernel, "bias": bias}
    return tree


def reference_layer(kernel: np.ndarray, r_main: int, r_sub: int, alpha: float):
    """RECIPE.md §2 the reference way: two pivoted QRs, dense products."""
    w0 = kernel.T
    k = min(w0.shape)
    q, _, p = scipy.linalg.qr(w0, pivoting=True, mode="economic")
    b_main = q[:, k - r_main : k]
    a_main = np.zeros((r_main, w0.shape[1]), np.float32)
    a_main[np.arange(r_main), p[k - r_main : k]] = 1.0
    q, _, p = scipy.linalg.qr(w0, pivoting=True, mode="economic")  # again, for the sub adapter
    b_sub = q[:, :r_sub]
    a_sub = np.zeros((r_sub, w0.shape[1]), np.float32)
    a_sub[np.arange(r_sub), p[:r_sub]] = 1.0
    s = np.float32(alpha / (r_main + r_sub))
    return w0 - s * (b_main @ a_main + b_sub @ a_sub), (a_main, b_main), (a_sub, b_sub)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=24, help="ViT-L blocks to initialise")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="project threads")
    parser.add_argument(
        "--threaded-reference",
        action="store_true",
        help="also time the reference with OpenBLAS's own threads (very slow on a shared host)",
    )
    args = parser.parse_args()
    arch = ARCHS["vitl14"]
    tree = random_kernels(args.blocks)
    paths = linear_layer_paths(arch)[: 4 * args.blocks]
    (paper,) = attach_rules(base_config().adapters, arch.depth)
    rules = [dataclasses.replace(paper, blocks=(0, args.blocks))]
    # Warm up: compile the project's QR for the four shapes outside the timed region.
    attach(random_kernels(1, seed=1), arch, [dataclasses.replace(rules[0], blocks=(0, 1))])

    def run_reference() -> tuple[dict, float]:
        t0 = time.perf_counter()
        out = {}
        for path in paths:
            block, group, name = path.split("/")
            out[path] = reference_layer(tree[block][group][name]["kernel"], 32, 4, 1.0)
        return out, time.perf_counter() - t0

    with threadpool_limits(limits=1):
        reference, t_ref_one = run_reference()  # single-threaded BLAS
    t_ref_blas = run_reference()[1] if args.threaded_reference else float("inf")
    t_ref = min(t_ref_blas, t_ref_one)

    def run_project(**kwargs) -> tuple[dict, float]:
        t0 = time.perf_counter()
        params, _ = attach(tree, arch, rules, progress=False, **kwargs)
        jax.block_until_ready(params)
        return params, time.perf_counter() - t0

    ours, t_ours = run_project(workers=args.workers)
    _, t_one = run_project(workers=1)
    with tempfile.TemporaryDirectory() as cache:
        run_project(cache_dir=cache)
        _, t_cache = run_project(cache_dir=cache)

    diff = 0.0
    for path in paths:
        block, group, name = path.split("/")
        layer = ours[block][group][name]
        w_res, (_, b_main), (_, b_sub) = reference[path]
        for got, want in (
            (layer["kernel"], w_res.T),
            (layer["adapter_main"]["b"], b_main.T),
            (layer["adapter_sub"]["b"], b_sub.T),
        ):
            diff = max(diff, float(np.abs(np.asarray(got) - want).max()))
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}, "
        f"scipy {scipy.__version__}, numpy {np.__version__}"
    )
    print(f"{len(paths)} kernels, main 32 + sub 4; max |project - reference| {diff:.2e}")
    print(f"ratios against the faster reference run ({t_ref:.2f} s)")
    rows = [
        ("reference: 2 scipy QRs/layer, 1 BLAS thread", t_ref_one),
        *([("reference: 2 scipy QRs/layer, BLAS threads", t_ref_blas)] * args.threaded_reference),
        (f"project: {args.workers} workers", t_ours),
        ("project: 1 worker", t_one),
        ("project: reload from the disk cache", t_cache),
    ]
    for name, seconds in rows:
        print(f"{name:<46}{seconds:8.2f} s   ratio {seconds / t_ref:.3f}")


if __name__ == "__main__":
    main()
