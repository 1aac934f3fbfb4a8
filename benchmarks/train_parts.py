"""The training step of ``train_step.py`` split in its parts, each timed alone, for JAX and the
PyTorch reference: backbone forward+backward (adapter gradients), head forward+backward (head
and feature gradients), set loss forward+backward (gradients of the ten prediction sets), the
optimizer update; and the whole step, so that the sum of the parts shows what composing them
costs in each framework.

JAX runs the package's own pieces (``setup.model.backbone`` / ``.head``, the config's head loss,
``setup.tx``: what ``train.py``'s step is made of), each jitted alone, and the step itself
(``train.trainer.make_train_step``). A part's input is the previous part's real output, its
output cotangent a fixed random tensor. PyTorch runs ``step_builders.TorchStep``'s stages with
detached inputs. Each framework runs in its own child process, one after the other, on the same
pinned cores (the JAX child re-executed with glibc's huge-page tunable as ``train.py`` is;
``RECYCLELORA_HUGEPAGES=0`` turns that off); inside a child the parts are timed in alternating
rounds (median of ``--repeats``). XLA's own figures per compiled part (bytes accessed, temp
memory) do not depend on the load.

    python benchmarks/train_parts.py --sizes s            # ViT-S, 3 rounds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from quiet import QUIET, check_load
from step_builders import add_step_args, check_step_args, jax_state, schedule, torch_step

from recyclelora_jax import hugepages

PARTS = ("backbone", "head", "loss", "optimizer", "step")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_step_args(p)
    p.set_defaults(sizes="s")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    p.add_argument("--child", nargs=2, metavar=("FRAMEWORK", "SIZE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    check_step_args(p, args)
    return args


def rounds(parts: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict]:
    """One untimed call of each part, then ``repeats`` rounds of one timed call each: per part
    the wall seconds, the system (kernel) seconds and the minor page faults of each call (a
    buffer's first touch after the allocator handed fresh pages)."""
    for fn in parts.values():
        fn()
    out = {name: {"wall": [], "sys": [], "faults": []} for name in parts}
    for _ in range(repeats):
        for name, fn in parts.items():
            use, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            fn()
            wall, end = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
            out[name]["wall"].append(wall)
            out[name]["sys"].append(end.ru_stime - use.ru_stime)
            out[name]["faults"].append(end.ru_minflt - use.ru_minflt)
    return out


# ----------------------------------------------------------------------------------------- JAX


def run_jax(size: str, args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp

    from recyclelora_jax import recipe
    from recyclelora_jax.train.trainer import head_loss, make_train_step

    setup, state, frozen, abstract, batch, _ = jax_state(size, args)
    model, loss = setup.model, head_loss(setup.cfg)
    trainable = state["trainable"]
    part = lambda tree, key: tree.get(key, {})
    bb_train, bb_frozen = part(trainable, "backbone"), part(frozen, "backbone")
    head_params = recipe.merge_trees(part(trainable, "head"), part(frozen, "head"))
    images, labels = batch["image"], batch["label"]
    rng = jax.random.key(setup.cfg.seed)

    def backbone(tr, fr, images, cotangent):
        features = lambda tr: model.backbone.apply({"params": recipe.merge_trees(tr, fr)}, images)[
            "features"
        ]
        return jax.vjp(features, tr)[1](cotangent)[0]

    def head(params, features, cotangent):
        out = lambda params, features: model.head.apply({"params": params}, features, train=True)
        return jax.vjp(out, params, features)[1](cotangent)

    def set_loss(outputs, labels, rng):
        return jax.value_and_grad(loss, has_aux=True)(outputs, labels, rng)[1]

    def update(trainable, opt, grads):
        updates, opt = setup.tx.update(grads, opt, trainable)
        return jax.tree.map(jnp.add, trainable, updates), opt

    like = lambda tree, seed: jax.tree.map(  # a fixed random cotangent shaped like ``tree``
        lambda x: 1e-3 * jax.random.normal(jax.random.key(seed), x.shape, x.dtype), tree
    )
    # Arguments, not closures: closed-over arrays would be compile-time constants to fold.
    features = jax.jit(
        lambda tr, fr, images: model.backbone.apply({"params": recipe.merge_trees(tr, fr)}, images)[
            "features"
        ]
    )(bb_train, bb_frozen, images)
    outputs = jax.jit(
        lambda params, features: model.head.apply({"params": params}, features, train=True)
    )(head_params, features)
    grads = like(trainable, 3)
    # Own copies: the optimizer part and the step donate (delete) their state arguments.
    step_state = {"run": jax.tree.map(jnp.copy, state)}
    opt_state = {"run": jax.tree.map(jnp.copy, (trainable, state["opt"]))}
    calls = {
        "backbone": (jax.jit(backbone), (bb_train, bb_frozen, images, like(features, 1))),
        "head": (jax.jit(head), (head_params, features, like(outputs, 2))),
        "loss": (jax.jit(set_loss), (outputs, labels, rng)),
    }
    compiled, figures, fns = {}, {}, {}
    start = time.perf_counter()
    for name, (fn, call_args) in calls.items():
        compiled[name] = fn.lower(*call_args).compile()
        fns[name] = lambda c=compiled[name], a=call_args: jax.block_until_ready(c(*a))
    compiled["optimizer"] = (
        jax.jit(update, donate_argnums=(0, 1)).lower(*opt_state["run"], grads).compile()
    )
    step_fn = make_train_step(setup, abstract, frozen)
    compiled["step"] = step_fn.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - start

    def optimizer() -> None:
        opt_state["run"] = jax.block_until_ready(compiled["optimizer"](*opt_state["run"], grads))

    def step() -> None:
        step_state["run"], metrics = compiled["step"](step_state["run"], frozen, batch)
        float(metrics["loss"])  # waits for the step

    fns.update(optimizer=optimizer, step=step)
    for name, c in compiled.items():
        mem, cost = c.memory_analysis(), c.cost_analysis()
        figures[name] = {
            "gb_accessed": cost.get("bytes accessed", float("nan")) / 1e9,
            "temp_gib": mem.temp_size_in_bytes / 2**30,
        }
    return {
        "times": rounds({n: fns[n] for n in PARTS}, args.repeats),
        "figures": figures,
        "compile_s": compile_s,
        "version": f"jax {jax.__version__}",
    }


# ------------------------------------------------------------------------------------- PyTorch


def run_torch(size: str, args: argparse.Namespace) -> dict:
    import torch
    import transformers

    ref = torch_step(size, args)
    opt = ref.optimizer
    params = [p for g in opt.param_groups for p in g["params"]]
    torch.manual_seed(1)
    with torch.no_grad():
        maps = ref.maps()
        masks, logits = ref.predictions(maps)
    random_like = lambda xs: [1e-3 * torch.randn_like(x) for x in xs]
    map_ct, out_ct = random_like(maps), random_like(masks + logits)
    leaf = lambda xs: [x.detach().requires_grad_() for x in xs]
    count = {"i": 0}

    def backbone() -> None:
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(ref.maps(), map_ct)

    def head() -> None:
        opt.zero_grad(set_to_none=True)
        inputs = leaf(maps)
        m, c = ref.predictions(inputs)
        torch.autograd.backward(m + c, out_ct)

    def loss() -> None:
        m, c = leaf(masks), leaf(logits)
        ref.set_loss(m, c).backward()

    def optimizer() -> None:
        for p in params:
            p.grad = torch.full_like(p, 1e-3)
        schedule(opt, count["i"])
        opt.step()
        count["i"] += 1

    def step() -> None:
        schedule(opt, count["i"])
        opt.zero_grad(set_to_none=True)
        total = ref.loss()
        total.backward()
        opt.step()
        count["i"] += 1
        total.item()

    fns = {"backbone": backbone, "head": head, "loss": loss, "optimizer": optimizer, "step": step}
    return {
        "times": rounds(fns, args.repeats),
        "version": f"torch {torch.__version__}, transformers {transformers.__version__}",
    }


# --------------------------------------------------------------------------------------- driver


def spawn(framework: str, size: str, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, *argv, "--child", framework, size]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
        sys.exit(f"{framework} child failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def medians(result: dict) -> dict[str, dict[str, float]]:
    """``{measure: {part: median}}`` with the parts' sum under ``"sum of the parts"``."""
    out = {}
    for key in ("wall", "sys", "faults"):
        m = {name: statistics.median(v[key]) for name, v in result["times"].items()}
        m["sum of the parts"] = sum(m[n] for n in PARTS[:-1])
        out[key] = m
    return out


def table(size: str, j: dict, t: dict) -> list[str]:
    jm, tm = medians(j), medians(t)
    figures = dict(j["figures"])
    figures["sum of the parts"] = {
        "gb_accessed": sum(figures[n]["gb_accessed"] for n in PARTS[:-1])
    }
    lines = [
        f"ViT-{size.upper()}: peak RSS JAX {j['peak_rss_gib']:.1f} GiB, torch "
        f"{t['peak_rss_gib']:.1f} GiB; JAX compile (parts and step) {j['compile_s']:.0f} s",
        "| part | JAX s | torch s | JAX / torch | system s JAX / torch | minor faults k JAX / "
        "torch | XLA GB accessed | XLA temp GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in (*PARTS[:-1], "sum of the parts", PARTS[-1]):
        jw, tw = jm["wall"][name], tm["wall"][name]
        f = figures[name]
        temp = f"{f['temp_gib']:.2f}" if "temp_gib" in f else ""
        lines.append(
            f"| {name} | {jw:.3f} | {tw:.3f} | {jw / tw:.2f} | {jm['sys'][name]:.2f} / "
            f"{tm['sys'][name]:.2f} | {jm['faults'][name] / 1e3:.0f} / "
            f"{tm['faults'][name] / 1e3:.0f} | {f['gb_accessed']:.1f} | {temp} |"
        )
    return lines


def main() -> None:
    args = parse_args()
    # Same cores for both, chosen before either library sizes its thread pools.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    if args.child:
        framework, size = args.child
        if framework == "jax":
            hugepages.reexec_with_huge_pages()  # what train.py does
        result = (run_jax if framework == "jax" else run_torch)(size, args)
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(json.dumps(result))
        return
    start_load = check_load(args.allow_loaded)
    argv, lines, versions, loads = sys.argv[1:], [], {}, [start_load]
    for size in args.sizes.split(","):
        j, t = spawn("jax", size, argv), spawn("torch", size, argv)
        loads.append(os.getloadavg()[0])
        versions.update(jax=j["version"], torch=t["version"])
        lines += table(size, j, t)
    print(
        f"{platform.machine()}, {args.threads} threads; {'; '.join(versions.values())}; "
        f"batch {args.batch}, {args.crop} px, float32, median of {args.repeats} rounds; JAX "
        f"backbone remat: {args.remat}, scanned layers: {args.scan}; one-minute load average "
        f"{start_load:.1f} at start, {loads[-1]:.1f} at the end"
        f"{' (LOADED)' if max(loads) >= QUIET else ''}"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
