"""DINOv2 backbone speed: this project's Flax model vs `transformers.Dinov2Model` (PyTorch).

Same random weights (the PyTorch model's, imported by `convert_tensors`), same inputs, same
thread count (pinned cores), float32. Times forward, and forward+backward with respect to the
input only (a frozen backbone, as in adapter training): medians of `--repeats` alternating runs
after a warm-up; JAX compile time apart. Prints a table with JAX / PyTorch time ratios.

    python benchmarks/backbone.py                       # S, B at 224 and 512; L at 224 (~5 min)
    python benchmarks/backbone.py --runs l@512          # the slow one (~8 min)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--runs",
        default="s@224,s@512,b@224,b@512,l@224",
        help="comma list of size@pixels, size in s, b, l (default: %(default)s)",
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="threads for both (default: 1)")
    return p.parse_args()


ARGS = parse_args()
# Same cores for both: pin the process before JAX / PyTorch size their thread pools (XLA has no
# reliable thread-count flag; it follows the CPUs the process may run on).
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: ARGS.threads])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from recyclelora_jax.convert import convert_tensors, infer_arch  # noqa: E402
from recyclelora_jax.models.dinov2 import DinoV2  # noqa: E402

SIZES = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16)}


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def race(jax_fn, torch_fn, repeats: int) -> tuple[float, float, float]:
    """(JAX compile, JAX median, PyTorch median) in seconds. The two run alternately, so load
    from other processes on a shared machine hits both alike; compile = first call - median."""
    first = _seconds(jax_fn)
    torch_fn()  # warm-up
    pairs = [(_seconds(jax_fn), _seconds(torch_fn)) for _ in range(repeats)]
    jax_s, torch_s = (statistics.median(p) for p in zip(*pairs, strict=True))
    return first - jax_s, jax_s, torch_s


def build(size: str):
    width, depth, heads = SIZES[size]
    config = transformers.Dinov2Config(
        hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, image_size=518
    )
    ref = transformers.Dinov2Model(config).eval().requires_grad_(False)
    tensors = {k: v.numpy() for k, v in ref.state_dict().items()}
    arch = infer_arch(tensors, "hf-transformers5")
    params = convert_tensors(tensors, arch, "hf-transformers5")
    model = DinoV2(arch, out_indices=(depth - 1,), interpolate_offset=0.0)  # transformers' form
    return ref, model, params


def bench(size: str, res: int, args) -> dict[str, float]:
    ref, model, params = build(size)
    images = np.random.default_rng(0).standard_normal((args.batch, res, res, 3), np.float32)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

    def tokens(x):
        out = model.apply({"params": params}, x)
        return out["x_norm_clstoken"].sum() + out["x_norm_patchtokens"].sum()

    jax_fwd = jax.jit(lambda x: model.apply({"params": params}, x)["x_norm_patchtokens"])
    jax_bwd = jax.jit(jax.grad(tokens))
    x = jnp.asarray(images)

    def torch_fwd():
        with torch.no_grad():
            return ref(pixels).last_hidden_state

    def torch_bwd():
        p = pixels.clone().requires_grad_(True)
        ref(p).last_hidden_state.sum().backward()
        return p.grad

    row = {}
    for name, jfn, tfn in [("fwd", jax_fwd, torch_fwd), ("fwd+bwd", jax_bwd, torch_bwd)]:
        row[f"{name} jax compile"], row[f"{name} jax"], row[f"{name} torch"] = race(
            lambda f=jfn: f(x).block_until_ready(), tfn, args.repeats
        )
    row["max_abs_diff"] = float(np.abs(np.asarray(jax_fwd(x)) - torch_fwd().numpy()[:, 1:]).max())
    return row


def main() -> None:
    torch.set_num_threads(ARGS.threads)
    print(
        f"jax {jax.__version__}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}; {ARGS.threads} threads, batch {ARGS.batch}, float32, "
        f"median of {ARGS.repeats}"
    )
    header = (
        "| model | px | fwd JAX s | fwd torch s | ratio | fwd+bwd JAX s | fwd+bwd torch s | "
        "ratio | JAX compile s (fwd / fwd+bwd) | max abs diff |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for run in ARGS.runs.split(","):
        size, res = run.split("@")
        r = bench(size, int(res), ARGS)
        print(
            f"| ViT-{size.upper()}/14 | {res} | {r['fwd jax']:.3f} | {r['fwd torch']:.3f} | "
            f"{r['fwd jax'] / r['fwd torch']:.2f} | {r['fwd+bwd jax']:.3f} | "
            f"{r['fwd+bwd torch']:.3f} | {r['fwd+bwd jax'] / r['fwd+bwd torch']:.2f} | "
            f"{r['fwd jax compile']:.1f} / {r['fwd+bwd jax compile']:.1f} | "
            f"{r['max_abs_diff']:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
