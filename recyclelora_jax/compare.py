"""Compare PEFT methods over seeds with one command.

``python -m recyclelora_jax.compare --config configs/demo.py --methods recyclelora,lora
--seeds 0,1,2 --workdir runs/compare --baseline lora [--config.train.steps=100 ...]``

Every (method, seed) is an ordinary training run: the config file with ``method=`` and ``seed=``
added to its arguments, then the ``--config.x=`` overrides, trained by ``train()`` in its own
workdir ``<workdir>/<method>/seed_<seed>``. A run resumes from its checkpoints and a finished run
(``result.json``) is not redone, so an interrupted comparison continues where it stopped. From
the runs' own ``metrics.jsonl`` and checkpoints it then writes ``comparison.{md,csv,json}``
(mean ± sample std over seeds of every evaluated dataset and of the target mean, the paired
difference to ``--baseline`` with its 95 % t interval, trainable parameters, step time, the
compiled step's memory), ``analysis.json`` (adapter analyses of every trained run) and the
figures ``bars.png``, ``loss.png`` and ``params.png``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

TARGET_MEAN = "target_mean"
FINISHED = "result.json"  # written when a run has trained and evaluated to its last step
RUN_CONFIG = "config.json"  # the resolved config a run directory belongs to
PREDICTIONS = "predictions.png"  # image | label | prediction rows of a run's last evaluation
ANALYSIS_KEYS = (
    "effective_rank_main",
    "effective_rank_sub",
    "effective_rank_lora",
    "grassmann_main_sub",
    "init_column_norm_ratio",
)

# ------------------------------------------------------------------------------- statistics


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof 1; 0 for one run) of per-seed values."""
    v = np.asarray(values, np.float64)
    std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "runs": [float(x) for x in v]}


def paired_difference(values: Sequence[float], baseline: Sequence[float]) -> dict[str, Any]:
    """Mean of the same-seed differences and its two-sided 95 % Student-t interval (n - 1
    degrees of freedom); no interval with fewer than two seeds."""
    from scipy import stats

    d = np.asarray(values, np.float64) - np.asarray(baseline, np.float64)
    mean, n = float(d.mean()), len(d)
    if n < 2:
        return {"mean": mean, "ci95": None, "n": n}
    half = float(stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n}


# ---------------------------------------------------------------------------- reading a run


def run_dir(workdir: Path, method: str, seed: int) -> Path:
    return Path(workdir) / method / f"seed_{seed}"


def read_metrics(rd: Path) -> list[dict]:
    path = rd / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: the run logged nothing")
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def final_miou(rows: list[dict], rd: Path) -> dict[str, float]:
    """Per-dataset mIoU of the run's last evaluation."""
    evals = [r["miou"] for r in rows if "miou" in r]
    if not evals:
        raise ValueError(f"{rd}/metrics.jsonl has no evaluation row (set eval.datasets)")
    return evals[-1]


def step_time(rows: list[dict]) -> float:
    """Median seconds per step over the logged intervals, the first (with the compile) left out."""
    times = [r["step_time"] for r in rows if "step_time" in r]
    return float(np.median(times[1:] if len(times) > 1 else times))


def target_names(cfg, datasets: Sequence[str]) -> list[str]:
    """The evaluated datasets that are not a training source's held-out images: a dataset read by
    a builder training also reads is the source domain (the demo's "synthetic")."""
    from recyclelora_jax.config import data_sources
    from recyclelora_jax.evaluate.suite import eval_sets

    source_builders = {s["builder"] for s in data_sources(cfg)}
    builder = {s.name: s.builder for s in eval_sets(cfg)}
    return [d for d in datasets if builder.get(d) not in source_builders]


# ------------------------------------------------------------------------------ the runs


def run_config(config: str, overrides: Mapping[str, Any], method: str, seed: int):
    """One run's config: the config file argument ``config`` (``path[:args]``) with ``method=``
    and ``seed=`` added, so the file applies them where it applies its other arguments, then the
    ``--config.x=`` ``overrides`` (``{"x": value}``), as ``train.py`` would resolve them."""
    from absl import flags
    from ml_collections import config_flags

    path, _, args = config.partition(":")
    taken = {a.split("=")[0].strip() for a in args.split(",") if a} & {"method", "seed"}
    if taken:
        raise ValueError(f"--config {config!r} sets {sorted(taken)}: --methods/--seeds choose them")
    spec = f"{path}:{','.join(filter(None, [args, f'method={method}', f'seed={seed}']))}"
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=False)
    values(["compare", f"--config={spec}"])
    cfg = values.config
    for key, value in overrides.items():
        config_flags.config_path.set_value(key, cfg, value)
    return cfg


def train_run(cfg, rd: Path) -> dict:
    """Train (or resume) one run in this process and mark it finished with its final mIoU."""
    from recyclelora_jax import runner
    from recyclelora_jax.train.trainer import train

    results = train(cfg, rd, runner.make_evaluator(cfg, rd / PREDICTIONS))
    result = {"miou": results["miou"]}
    tmp = rd / (FINISHED + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(rd / FINISHED)
    return result


def _claim(rd: Path, cfg) -> None:
    """A run directory belongs to one resolved config: reusing it for another is an error."""
    text = cfg.to_json_best_effort(indent=1, sort_keys=True) + "\n"
    file = rd / RUN_CONFIG
    if file.exists() and file.read_text() != text:
        raise ValueError(
            f"{rd} holds a run of another config (see {file}): use another --workdir, or "
            "delete that run to train it again"
        )
    rd.mkdir(parents=True, exist_ok=True)
    file.write_text(text)


def train_runs(
    config: str,
    overrides: Mapping[str, Any],
    methods: Sequence[str],
    seeds: Sequence[int],
    workdir: Path,
) -> None:
    """Train every (method, seed) not finished yet, one progress line per run."""
    runs = [(m, s) for m in methods for s in seeds]
    for i, (method, seed) in enumerate(runs, 1):
        rd = run_dir(workdir, method, seed)
        cfg = run_config(config, overrides, method, seed)
        _claim(rd, cfg)
        head = f"[{i}/{len(runs)}] {method} seed {seed}"
        if (rd / FINISHED).exists():
            print(f"{head}: finished earlier, skipped ({rd})", flush=True)
            continue
        resumed = " (resuming)" if (rd / "checkpoints").exists() else ""
        print(f"{head}: training{resumed} in {rd} ...", flush=True)
        start = time.perf_counter()
        miou = train_run(cfg, rd)["miou"]
        cells = ", ".join(f"{k} {v:.2f}" for k, v in miou.items())
        print(f"{head}: done in {time.perf_counter() - start:.0f} s, mIoU {cells}", flush=True)


# ------------------------------------------------------------------- costs and analyses


def step_cost(cfg) -> dict[str, int]:
    """Trainable parameters (all, and of the backbone) and the per-device memory of the
    compiled training step (arguments + outputs + temporaries - donated), for ``cfg``'s shapes."""
    import jax

    from recyclelora_jax.train import trainer
    from recyclelora_jax.train.sharding import make_mesh

    setup, state, frozen, batch = trainer.abstract_train_state(cfg, make_mesh(**cfg.mesh))
    mem = trainer.make_train_step(setup, state, frozen).lower(state, frozen, batch).compile()
    mem = mem.memory_analysis()
    size = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
    return {
        "trainable_params": size(state["trainable"]),
        "trainable_backbone_params": size(state["trainable"].get("backbone", {})),
        "step_memory_bytes": int(
            mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes
        ),
    }


def analyse_run(rd: Path) -> dict[str, float]:
    """The paper's adapter analyses of a run's last checkpoint against the init it started from:
    mean effective rank of each adapter, mean Grassmann distance between the first two adapters'
    output subspaces (main and sub), and, where the init chose input columns (RRQR: ``a`` is zero
    elsewhere), the mean init-column norm ratio of the main adapter's update. Empty without
    adapters."""
    import jax

    from recyclelora_jax import build
    from recyclelora_jax.analysis import adapter_stats, column_norm_ratios
    from recyclelora_jax.export import restore_run

    model, trained, cfg = restore_run(rd)
    layout = model.backbone.adapters
    if not layout:
        return {}
    trained = jax.device_get(trained)["backbone"]
    stats = adapter_stats(trained, layout)["layers"]
    out: dict[str, float] = {}
    for name in sorted({n for _, spec in layout for n, _ in spec.ranks}):
        ranks = [entry[name]["effective_rank"] for entry in stats.values() if name in entry]
        out[f"effective_rank_{name}"] = float(np.mean(ranks))
    grassmann = [entry["grassmann_b"] for entry in stats.values() if "grassmann_b" in entry]
    if grassmann:
        out["grassmann_main_sub"] = float(np.mean(grassmann))
    backbone, base = build.load_backbone_weights(cfg, cfg.seed)
    init = jax.device_get(build.init_params(cfg, backbone, base, rd)[1])["backbone"]
    try:
        ratios = column_norm_ratios(trained, init, layout, "main")
    except ValueError:  # an init that chose no input columns (LoRA's dense ``a``)
        return out
    if ratios:
        out["init_column_norm_ratio"] = float(np.mean(list(ratios.values())))
    return out


# -------------------------------------------------------------------------------- summary


def collect(cfg, methods: Sequence[str], seeds: Sequence[int], workdir: Path, baseline: str):
    """``{method: {dataset: {"mean", "std", "runs", "seeds"[, "diff"]}, "step_time_s"}}`` from
    the runs' ``metrics.jsonl``, with the mean over the target datasets as ``target_mean``."""
    per_run: dict[str, dict[int, dict[str, float]]] = {}
    times: dict[str, list[float]] = {}
    for method in methods:
        for seed in seeds:
            rd = run_dir(workdir, method, seed)
            rows = read_metrics(rd)
            miou = final_miou(rows, rd)
            targets = target_names(cfg, list(miou))
            if not targets:
                raise ValueError(f"{rd}: no evaluated dataset is a target: {sorted(miou)}")
            miou[TARGET_MEAN] = float(np.mean([miou[t] for t in targets]))
            per_run.setdefault(method, {})[seed] = miou
            times.setdefault(method, []).append(step_time(rows))
    out: dict[str, Any] = {}
    for method, runs in per_run.items():
        entry: dict[str, Any] = {}
        for dataset in runs[seeds[0]]:
            values = [runs[s][dataset] for s in seeds]
            entry[dataset] = {**summarize(values), "seeds": list(seeds)}
            if baseline in per_run and method != baseline:
                base = [per_run[baseline][s][dataset] for s in seeds]
                entry[dataset]["diff"] = {"baseline": baseline, **paired_difference(values, base)}
        entry["step_time_s"] = float(np.mean(times[method]))
        out[method] = entry
    return out


def datasets_of(results: dict[str, Any]) -> list[str]:
    first = next(iter(results.values()))
    return [k for k, v in first.items() if isinstance(v, dict) and "mean" in v]


def means_over_seeds(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{method: {dataset: mean over seeds}}``: the comparison in one line."""
    return {m: {d: r[d]["mean"] for d in datasets_of(results)} for m, r in results.items()}


def _diff_cell(diff: dict | None) -> str:
    if diff is None:
        return "–"
    if diff["ci95"] is None:
        return f"{diff['mean']:+.2f}"
    low, high = diff["ci95"]
    return f"{diff['mean']:+.2f} [{low:+.2f}, {high:+.2f}]"


def markdown(results: dict[str, Any], baseline: str) -> str:
    """The comparison table, then the adapter analyses' table."""
    names = datasets_of(results)
    head = ["method", *names, f"Δ {TARGET_MEAN} vs {baseline} [95 % CI]"]
    head += ["trainable", "of which backbone", "step (ms)", "step memory (MiB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, r in results.items():
        cells = [method, *(f"{r[d]['mean']:.2f} ± {r[d]['std']:.2f}" for d in names)]
        cells.append(_diff_cell(r[TARGET_MEAN].get("diff")))
        cells += [
            f"{r['trainable_params']:,}",
            f"{r['trainable_backbone_params']:,}",
            f"{1000 * r['step_time_s']:.1f}",
            f"{r['step_memory_bytes'] / 2**20:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = next(iter(results.values()))[names[0]]["seeds"]
    lines += [
        "",
        f"mIoU (%) over seeds {seeds}: mean ± sample std. Δ: mean same-seed difference to "
        f"{baseline} with its two-sided 95 % Student-t interval. Step: median time per step; "
        "memory: the compiled step's, per device.",
    ]
    keys = [k for k in ANALYSIS_KEYS if any(k in r for r in results.values())]
    if keys:
        lines += ["", "Adapter analyses (mean over seeds and layers):", ""]
        lines += ["| method | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
        for method, r in results.items():
            cells = [f"{r[k]:.3f}" if k in r else "–" for k in keys]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(results: dict[str, Any]) -> str:
    """One row per (method, dataset), the per-seed values as ``seed_<s>`` columns."""
    names = datasets_of(results)
    seeds = next(iter(results.values()))[names[0]]["seeds"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(
        [
            *("method", "dataset", "mean", "std", *(f"seed_{s}" for s in seeds)),
            *("diff_mean", "diff_ci95_low", "diff_ci95_high"),
            *("trainable_params", "step_time_s", "step_memory_bytes"),
        ]
    )
    for method, r in results.items():
        for d in names:
            diff = r[d].get("diff") or {}
            low, high = diff.get("ci95") or (None, None)
            writer.writerow(
                [
                    *(method, d, r[d]["mean"], r[d]["std"], *r[d]["runs"]),
                    *(diff.get("mean"), low, high),
                    *(r["trainable_params"], r["step_time_s"], r["step_memory_bytes"]),
                ]
            )
    return buf.getvalue()


def plot_bars(results: dict[str, Any], file: Path) -> None:
    """Grouped bars: datasets on x, one bar per method, error bars = std, dots = seeds."""
    from matplotlib.figure import Figure

    names = datasets_of(results)
    fig = Figure(figsize=(2 + 0.5 * len(names) * len(results), 4.2))
    ax = fig.subplots()
    width = 0.8 / len(results)
    for k, (method, r) in enumerate(results.items()):
        x = np.arange(len(names)) + (k - (len(results) - 1) / 2) * width
        ax.bar(x, [r[d]["mean"] for d in names], width, yerr=[r[d]["std"] for d in names],
               capsize=3, label=method)  # fmt: skip
        for xi, d in zip(x, names, strict=True):
            ax.plot([xi] * len(r[d]["runs"]), r[d]["runs"], "k.", ms=3)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylabel("mIoU (%)")
    ax.set_title("mIoU per dataset (mean ± std over seeds; dots: seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(len(results), 4))
    fig.tight_layout()
    fig.savefig(file, dpi=110)


def plot_losses(workdir: Path, methods: Sequence[str], seeds: Sequence[int], file: Path) -> None:
    """Training loss against step: the mean over seeds per method, the seeds' range shaded."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for method in methods:
        curves = [
            {r["step"]: r["loss"] for r in read_metrics(run_dir(workdir, method, s)) if "loss" in r}
            for s in seeds
        ]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        values = np.array([[c[s] for s in steps] for c in curves])
        (line,) = ax.plot(steps, values.mean(0), label=method)
        ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title("training loss (mean over seeds, range shaded)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=110)


def plot_params(results: dict[str, Any], file: Path) -> None:
    """Target-mean mIoU (± std) against trainable parameters."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.2))
    ax = fig.subplots()
    for method, r in results.items():
        x, t = r["trainable_params"], r[TARGET_MEAN]
        ax.errorbar(x, t["mean"], yerr=t["std"], fmt="o", capsize=3)
        ax.annotate(method, (x, t["mean"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (adapters + head)")
    ax.set_ylabel("target mean mIoU (%)")
    ax.set_title("target mIoU vs trainable parameters")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(file, dpi=110)


def summarise(
    config: str,
    overrides: Mapping[str, Any],
    methods: Sequence[str],
    seeds: Sequence[int],
    workdir: Path,
    baseline: str,
) -> dict[str, Any]:
    """Tables, figures and analyses of the finished runs; returns the comparison."""
    cfgs = {m: run_config(config, overrides, m, seeds[0]) for m in methods}
    results = collect(cfgs[methods[0]], methods, seeds, workdir, baseline)
    analyses = {m: {str(s): analyse_run(run_dir(workdir, m, s)) for s in seeds} for m in methods}
    for method in methods:
        results[method].update(step_cost(cfgs[method]))
        per_seed = list(analyses[method].values())
        for key in sorted(set.intersection(*(set(a) for a in per_seed))):
            results[method][key] = float(np.mean([a[key] for a in per_seed]))
    (workdir / "analysis.json").write_text(json.dumps(analyses, indent=1) + "\n")
    (workdir / "comparison.json").write_text(json.dumps(results, indent=1) + "\n")
    (workdir / "comparison.csv").write_text(csv_text(results))
    table = markdown(results, baseline)
    (workdir / "comparison.md").write_text(table)
    plot_bars(results, workdir / "bars.png")
    plot_losses(workdir, methods, seeds, workdir / "loss.png")
    plot_params(results, workdir / "params.png")
    print(table, flush=True)
    return results


def compare(
    config: str,
    overrides: Mapping[str, Any],
    methods: Sequence[str],
    seeds: Sequence[int],
    workdir: str | Path,
    baseline: str,
) -> dict[str, Any]:
    """Train what is missing, then summarise. ``config``: the config file argument
    (``path[:args]``); ``overrides``: ``{"a.b": value}`` applied to every run."""
    workdir = Path(workdir)
    if not methods or not seeds:
        raise ValueError("need at least one method and one seed")
    if len(set(methods)) != len(methods) or len(set(seeds)) != len(seeds):
        raise ValueError(f"repeated method or seed in {list(methods)} / {list(seeds)}")
    if baseline not in methods:
        print(f"baseline {baseline!r} is not among {list(methods)}: no paired differences")
    train_runs(config, overrides, methods, seeds, workdir)
    return summarise(config, overrides, methods, seeds, workdir, baseline)


def use_compile_cache(workdir: Path) -> None:
    """Keep compiled programs in ``<workdir>/jax_cache`` (unless a cache is configured already,
    e.g. by ``JAX_COMPILATION_CACHE_DIR``): the seeds of a method, and a resumed comparison,
    compile once. Call before anything compiles."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(Path(workdir).absolute() / "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main() -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file(
        "config", None, "Config file with arguments, as for train.py.", lock_config=True
    )
    methods = flags.DEFINE_list("methods", ["recyclelora", "lora"], "PEFT methods to compare.")
    seeds = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of every method.")
    workdir = flags.DEFINE_string("workdir", "runs/compare", "Comparison directory.")
    baseline = flags.DEFINE_string("baseline", "lora", "Method the paired differences refer to.")

    def run(argv: list[str]) -> None:
        import logging
        import signal
        import sys

        from recyclelora_jax import runner
        from recyclelora_jax.train.trainer import ConfigError, Preempted

        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if config.value is None:
            raise app.UsageError("--config is required (e.g. --config configs/demo.py)")
        runner.quiet_library_logs()
        use_compile_cache(Path(workdir.value))
        try:
            compare(
                config_flags.get_config_filename(flags.FLAGS["config"]),
                config_flags.get_override_values(flags.FLAGS["config"]),
                methods.value,
                [int(s) for s in seeds.value],
                workdir.value,
                baseline.value,
            )
        except Preempted as err:
            logging.error("interrupted: %s; rerun the same command to continue", err)
            sys.exit(128 + signal.SIGTERM)
        except ConfigError as err:
            raise app.UsageError(str(err)) from None

    app.run(run)


if __name__ == "__main__":
    main()
