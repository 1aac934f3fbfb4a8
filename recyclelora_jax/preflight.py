"""Compile the training step for a TPU topology (or the local devices) and report its cost.

``python -m recyclelora_jax.preflight --config configs/g2cbm.py --topology v5p:2x2x1``

The step is the one ``train.py`` runs (``train.trainer.make_train_step``), lowered with abstract
arguments (shapes, dtypes and shardings; nothing is allocated, no weights are read, no adapter is
initialised) and compiled ahead of time: for a TPU topology with libtpu (``pip install
".[tpu]"``) and no TPU, or for the local CPU/GPU devices (``--topology local``). Per chip it
prints the compiler's buffer plan against the chip's HBM, its FLOPs against the analytic count
of ``models.flops``, bytes accessed, its time estimate with the images/s and MFU that implies,
the compile time and the collectives in the program; then the same for the backbone, the head
and the loss compiled alone and for the sliding-window evaluation step. It exits with status 1
when the training step does not fit the chip.

``cost_analysis()`` counts a ``while`` body once, so the costs of a program with loops (scanned
layers, the loss's prediction sets) are not the program's: the table marks them with ``*`` and
counts the loops. ``--unrolled_costs`` compiles each program a second time with the package's loops
unrolled (``models.loops``: the same computation, every trip counted) and takes FLOPs, bytes and
the estimate from it; memory, compile time and collectives stay those of the program train.py
runs. Loops left in the unrolled program are still counted once: the matcher's (microseconds on
a TPU) and, on a CPU, the random-bit generator's rounds.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from recyclelora_jax import recipe
from recyclelora_jax.models import flops as flops_lib
from recyclelora_jax.models import loops
from recyclelora_jax.models.dinov2 import resolve_attention
from recyclelora_jax.models.sampling import resolve_sampling
from recyclelora_jax.models.segmentor import Segmentor
from recyclelora_jax.train import trainer
from recyclelora_jax.train.sharding import (
    BATCH_AXES,
    make_mesh,
    replicated,
    tree_shardings,
)

GiB = 2**30
Params = dict[str, Any]
NamedSharding, P = jax.sharding.NamedSharding, jax.sharding.PartitionSpec


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip HBM and bfloat16 peak (None where unknown, e.g. a CPU)."""

    kind: str
    hbm_bytes: int | None
    bf16_flops: float | None


# Published per-chip HBM and dense bf16 peak FLOP/s.
TPU_CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12),
    "v5e": Chip("v5e", 16 * GiB, 197e12),
    "v5p": Chip("v5p", 95 * GiB, 459e12),
    "v6e": Chip("v6e", 32 * GiB, 918e12),
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE_RE = re.compile(
    r"=\s*(\(?[^=]*?\)?)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(", re.MULTILINE
)
_SHAPE_RE = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_WHILE_RE = re.compile(r"\swhile\(")
COSTS = ("flops", "bytes_accessed", "estimated_step_seconds", "images_per_second", "mfu")


def topology(name: str) -> tuple[list[Any], Chip]:
    """Devices and chip of ``name``: a TPU topology such as ``v5p:2x2x1`` or ``local``."""
    if name == "local":
        devices = jax.devices()
        stats = devices[0].memory_stats() or {}
        capacity = stats.get("bytes_limit")
        if capacity is None and devices[0].platform == "cpu":
            capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return devices, Chip(devices[0].device_kind, capacity, None)
    kind = name.split(":")[0]
    if kind not in TPU_CHIPS:
        raise ValueError(
            f"--topology {name!r}: use local or <chip>:<shape> with chip in {sorted(TPU_CHIPS)}"
        )
    from jax.experimental import topologies

    # No chip is touched: skip the metadata server, and let several compiling processes load
    # libtpu at once (it otherwise holds a machine-wide lock file).
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name)
    except Exception as e:  # libtpu missing or an unknown shape
        raise RuntimeError(
            f"--topology {name!r}: cannot describe this TPU topology ({e}); deviceless TPU "
            'compiles need libtpu: pip install -e ".[tpu]"'
        ) from e
    return list(desc.devices), TPU_CHIPS[kind]


def abstract_run(
    cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, per_chip_batch: int = 1
) -> tuple[trainer.Setup, trainer.State, Params, dict]:
    """``trainer.abstract_train_state`` for ``per_chip_batch`` images per chip: the same model,
    adapters, labels and optimizer as a run, from the config's architecture (no weights read)."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())  # an unlocked copy
    cfg.train.batch_size = per_chip_batch * mesh.size
    return trainer.abstract_train_state(cfg, mesh)


def _placed(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _batched(mesh: jax.sharding.Mesh, shape: tuple[int, ...], dtype: Any, axis: int = 0) -> Any:
    spec = [None] * len(shape)
    spec[axis] = BATCH_AXES
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*spec)))


def _params(mesh: jax.sharding.Mesh, tree: Params) -> Params:
    return _placed(tree, tree_shardings(mesh, tree))


def model_flops(cfg: ml_collections.ConfigDict, setup: trainer.Setup) -> dict[str, flops_lib.Flops]:
    """Analytic FLOPs of one image: backbone, head and loss of the training step, and the
    forward pass of one evaluation window (with the per-pixel class scores)."""
    arch, layout = setup.model.backbone.arch, setup.model.backbone.adapters
    mode = {"full": "full", "frozen": "frozen"}.get(cfg.method, "adapters")
    out = tuple(cfg.model.backbone.out_indices)
    h = dict(cfg.model.head)

    def model(crop: int) -> tuple[flops_lib.Flops, flops_lib.Flops]:
        grid = (crop // arch.patch_size,) * 2
        backbone = flops_lib.backbone_flops(arch, (crop, crop), out, layout, mode)
        if h["name"] == "mask2former":
            return backbone, flops_lib.mask2former_flops(h, arch.embed_dim, grid)
        return backbone, flops_lib.linear_head_flops(
            h["num_classes"], arch.embed_dim, grid, len(out)
        )

    backbone, head = model(cfg.data.crop_size)
    loss = flops_lib.Flops()
    scores = 0.0
    if h["name"] == "mask2former":
        lc = trainer.loss_config(cfg)
        loss = flops_lib.set_loss_flops(h, lc.num_points, lc.oversample_ratio)
        scores = 2.0 * cfg.eval.crop_size**2 * h.get("num_queries", 100) * h["num_classes"]
    eval_backbone, eval_head = model(cfg.eval.crop_size)
    forward = eval_backbone.forward + eval_head.forward + scores
    return {"backbone": backbone, "head": head, "loss": loss, "eval": flops_lib.Flops(forward)}


def programs(
    cfg: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    per_chip_batch: int,
    parts: bool,
    evaluate: bool,
) -> dict[str, tuple]:
    """Name -> (jitted function, abstract arguments, analytic FLOPs per image)."""
    setup, state, frozen, batch = abstract_run(cfg, mesh, per_chip_batch)
    f = model_flops(cfg, setup)
    total = f["backbone"] + f["head"] + f["loss"]
    out = {"train": (trainer.make_train_step(setup, state, frozen), (state, frozen, batch), total)}
    if parts:
        out.update(_part_programs(setup, batch, state["trainable"], frozen, f))
    if evaluate:
        n = per_chip_batch * mesh.size
        windows = _batched(mesh, (n, cfg.eval.crop_size, cfg.eval.crop_size, 3), jnp.float32)
        model = setup.model
        predict = jax.jit(lambda p, x: model.apply({"params": p}, x, method=Segmentor.predict))
        params = _params(mesh, recipe.merge_trees(state["trainable"], frozen))
        out["eval"] = (predict, (params, windows), f["eval"])
    return out


def _part_programs(setup, batch, trainable, frozen, f) -> dict[str, tuple]:
    """Backbone, head and loss, each forward + backward with the cotangent as an argument."""
    model, mesh, cfg = setup.model, setup.mesh, setup.cfg
    images, labels = batch["image"], batch["label"]
    loss_fn = trainer.head_loss(cfg)
    tb, fb = trainable.get("backbone", {}), frozen.get("backbone", {})
    th, fh = trainable.get("head", {}), frozen.get("head", {})

    def features(tb, fb, images):
        return model.backbone.apply({"params": recipe.merge_trees(tb, fb)}, images)["features"]

    def outputs(th, fh, feats):
        return model.head.apply({"params": recipe.merge_trees(th, fh)}, feats, train=True)

    def backbone(tb, fb, images, cotangent):
        return jax.vjp(lambda t: features(t, fb, images), tb)[1](cotangent)

    def head(th, fh, feats, cotangent):
        return jax.vjp(lambda t, x: outputs(t, fh, x), th, feats)[1](cotangent)

    def loss(outs, labels, step):
        rng = jax.random.fold_in(jax.random.key(cfg.seed), step)
        return jax.grad(lambda o: loss_fn(o, labels, rng)[0])(outs)

    feats = [_batched(mesh, x.shape, x.dtype) for x in jax.eval_shape(features, tb, fb, images)]
    outs = {  # aux_* are (sets, B, ...)
        k: _batched(mesh, v.shape, v.dtype, axis=int(k.startswith("aux")))
        for k, v in jax.eval_shape(outputs, th, fh, feats).items()
    }
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh))
    return {
        "backbone": (jax.jit(backbone), (tb, fb, images, feats), f["backbone"]),
        "head": (jax.jit(head), (th, fh, feats, outs), f["head"]),
        "loss": (jax.jit(loss), (outs, labels, step), f["loss"]),
    }


def collectives(hlo: str) -> dict[str, dict[str, int]]:
    """Count and result bytes of each collective op in optimised HLO text."""
    found: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
    for shapes, op in _COLLECTIVE_RE.findall(hlo):
        found[op]["count"] += 1
        for dtype, dims in _SHAPE_RE.findall(shapes):
            size = 1 if dtype == "pred" else int(re.sub(r"\D", "", dtype)) // 8
            for d in filter(None, dims.split(",")):
                size *= int(d)
            found[op]["bytes"] += size
    return dict(found)


def compile_program(
    fn: Callable, args: tuple, chip: Chip, per_chip_batch: int, model: flops_lib.Flops
) -> dict:
    """Lower and compile ``fn`` for ``args``; the compiler's per-chip plan, cost and collectives."""
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list | tuple) else cost) or {}
    hbm = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )
    estimate = cost.get("optimal_seconds")
    estimate = float(estimate) if estimate is not None and estimate > 0 else None
    flops = model.train * per_chip_batch
    analytic = flops / chip.bf16_flops if chip.bf16_flops else None
    return {
        "hbm_bytes": int(hbm),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "hbm_capacity_bytes": chip.hbm_bytes,
        "fits": chip.hbm_bytes is None or hbm <= chip.hbm_bytes,
        "flops": float(cost.get("flops", 0.0)),
        "model_flops": flops,
        "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        "estimated_step_seconds": estimate,
        "analytic_step_seconds": analytic,
        "images_per_second": per_chip_batch / estimate if estimate else None,
        "mfu": analytic / estimate if analytic and estimate else None,
        "compile_seconds": seconds,
        "collectives": collectives(hlo := compiled.as_text()),
        "while_loops": len(_WHILE_RE.findall(hlo)),  # each body counted once in the costs
    }


def preflight(
    cfg: ml_collections.ConfigDict,
    topology_name: str,
    per_chip_batch: int | None = None,
    parts: bool = True,
    evaluate: bool = True,
    log: Callable[[str], None] = print,
    unrolled_costs: bool = False,
) -> dict:
    """Compile every program for ``topology_name``; returns the report (see ``--json``).

    With ``unrolled_costs`` each program is compiled again with its loops unrolled, and its
    costs (`COSTS`) are that program's: see the module docstring."""
    devices, chip = topology(topology_name)
    mesh = make_mesh(**cfg.mesh, devices=devices)
    # "auto" attention and sampling are resolved for the target's platform, not for this host's.
    cfg = cfg.copy_and_resolve_references()
    b, h, platform = cfg.model.backbone, cfg.model.head, devices[0].platform
    with cfg.unlocked():
        b.attention = resolve_attention(b.get("attention", "auto"), platform, b.dtype)
        if "sampling" in h:
            h.sampling = resolve_sampling(h.sampling, platform)
    if per_chip_batch is None:
        per_chip_batch = max(cfg.train.batch_size // mesh.size, 1)
    report: dict[str, Any] = {
        "topology": topology_name,
        "chip": chip.kind,
        "chips": mesh.size,
        "mesh": dict(mesh.shape),
        "per_chip_batch": per_chip_batch,
        "bf16_peak_flops": chip.bf16_flops,
        "attention": b.attention,
        "sampling": h.get("sampling"),
        "costs": "unrolled" if unrolled_costs else "counted",
    }

    def compile_all(how: str = "") -> dict[str, dict]:
        """Every program traced afresh (so a loop switch in context reaches it) and compiled."""
        out = {}
        for name, (fn, args, model) in programs(cfg, mesh, per_chip_batch, parts, evaluate).items():
            log(f"compiling {name}{how} ...")
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # as the training step's own
                out[name] = compile_program(fn, args, chip, per_chip_batch, model)
        return out

    results = compile_all()
    if unrolled_costs:
        with loops.unrolled():
            for name, u in compile_all(" with its loops unrolled").items():
                results[name].update({k: u[k] for k in COSTS})
                results[name]["unrolled_while_loops"] = u["while_loops"]
                results[name]["unrolled_compile_seconds"] = u["compile_seconds"]
    for name, result in results.items():
        if name == "train":
            report.update(result)
        elif name == "eval":
            report["eval"] = result
        else:
            report.setdefault("parts", {})[name] = result
    return report


def _fmt(x: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if x is None else format(x * scale, spec)


def format_report(r: dict) -> str:
    """A table, one row per compiled program, all figures per chip; ``*`` marks costs that
    count some loop body once."""
    rows = [
        f"{r['topology']}: {r['chips']} x {r['chip']}, mesh {r['mesh']}, per-chip batch "
        f"{r['per_chip_batch']}, HBM {_fmt(r['hbm_capacity_bytes'], '.1f', 1 / GiB)} GiB, "
        f"attention {r['attention']}, sampling {r.get('sampling') or '-'}",
        "program | HBM GiB (args/temp/out) | fits | TFLOP (model) | GiB accessed | est. ms | "
        f"img/s | MFU | compile s | loops ({r.get('costs', 'counted')}) | collectives (count, GiB)",
    ]
    items = [("train", r), *r.get("parts", {}).items()]
    items += [("eval", r["eval"])] if "eval" in r else []
    for name, x in items:
        gib = lambda key, x=x: _fmt(x[key], ".2f", 1 / GiB)
        coll = ", ".join(
            f"{k} {v['count']} ({v['bytes'] / GiB:.2f})" for k, v in x["collectives"].items()
        )
        left = x.get("unrolled_while_loops", x["while_loops"])
        mark = "*" if left else ""
        loop_note = str(x["while_loops"])
        if "unrolled_while_loops" in x:
            loop_note += f", {left} left unrolled"
        rows.append(
            " | ".join(
                [
                    name,
                    f"{gib('hbm_bytes')} ({gib('argument_bytes')}/{gib('temp_bytes')}/"
                    f"{gib('output_bytes')})",
                    "yes" if x["fits"] else "NO",
                    f"{x['flops'] / 1e12:.4g}{mark} ({x['model_flops'] / 1e12:.4g})",
                    gib("bytes_accessed") + mark,
                    _fmt(x["estimated_step_seconds"], ".1f", 1e3) + mark,
                    _fmt(x["images_per_second"], ".1f"),
                    _fmt(x["mfu"], ".1%"),
                    f"{x['compile_seconds']:.1f}",
                    loop_note,
                    coll or "none",
                ]
            )
        )
    if any("*" in row for row in rows[2:]):
        rows.append(
            "* a loop body counted once, not every trip: "
            + (
                "loops the package does not unroll (the matcher's; on a CPU, the random bits')"
                if r.get("costs") == "unrolled"
                else "--unrolled_costs counts them"
            )
        )
    return "\n".join(rows)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    report = preflight(
        _CONFIG.value,
        _TOPOLOGY.value,
        _BATCH.value,
        _PARTS.value,
        _EVAL.value,
        log=print,
        unrolled_costs=_UNROLLED.value,
    )
    print(format_report(report))
    if _JSON.value:
        Path(_JSON.value).write_text(json.dumps(report, indent=1))
    exit_unless_fits(report)


def exit_unless_fits(report: dict) -> None:
    """Exit with status 1 and the sizes when the training step does not fit the chip."""
    if not report["fits"]:
        sys.exit(
            f"preflight: the training step needs {report['hbm_bytes'] / GiB:.2f} GiB per chip, "
            f"{report['chip']} has {report['hbm_capacity_bytes'] / GiB:.2f} GiB; lower "
            "--per-chip-batch, or set --config.model.backbone.remat=True, dtype=bfloat16, "
            "mesh.fsdp > 1"
        )


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, as for train.py.")
    _TOPOLOGY = flags.DEFINE_string(
        "topology", "local", "A TPU topology (v5p:2x2x1, v5e:2x2, v4:2x2x1, v6e:2x2, ...) or local."
    )
    _BATCH = flags.DEFINE_integer(
        "per-chip-batch", None, "Images per chip (default: train.batch_size / chips)."
    )
    _PARTS = flags.DEFINE_bool("parts", True, "Also compile backbone, head and loss alone.")
    _EVAL = flags.DEFINE_bool("eval", True, "Also compile the sliding-window evaluation step.")
    _JSON = flags.DEFINE_string("json", None, "Write the report to this JSON file.")
    _UNROLLED = flags.DEFINE_bool(
        "unrolled_costs",
        False,
        "Count every loop trip: compile each program again with its loops unrolled and take "
        "FLOPs, bytes and the time estimate from it (compiles take longer; without it, costs "
        "of programs with loops count each loop body once, marked *).",
    )
    flags.mark_flag_as_required("config")
    app.run(main)
