"""`recyclelora_jax.compare` on the tiny config: the frozen backbone against RecycleLoRA (which
trains adapters too), two seeds, four steps each.

The command line is started once and killed with SIGKILL during its first run's evaluation at
step 2 (just after that step's checkpoint); a call in this process then resumes that run and
trains the other three, and a third call trains nothing. Every number in the outputs is
recomputed here from the runs' own metrics.jsonl and checkpoints with numpy and scipy.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import signal
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image
from scipy import stats
from train_helpers import process_group, tiny_config

from recyclelora_jax import analysis, compare
from recyclelora_jax.analysis import effective_rank
from recyclelora_jax.data.transforms import normalize
from recyclelora_jax.export import restore_run

METHODS, SEEDS, STEPS, BASELINE = ("recyclelora", "frozen"), (0, 1), 4, "frozen"
RUNS = len(METHODS) * len(SEEDS)


def _compare(config_file, workdir, overrides=None):
    """One in-process comparison call; returns its printed lines."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        compare.compare(str(config_file), overrides or {}, METHODS, SEEDS, workdir, BASELINE)
    return out.getvalue()


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("compare")
    cfg = tiny_config(data, steps=STEPS, checkpoint_every=2, eval_every=2)
    cfg.optim.lr = 0.05  # four steps must move the adapters far enough to change predictions
    cfg.mesh.data = 1
    config_file = root / "tiny.py"
    config_file.write_text(
        "import ml_collections\n"
        "from recyclelora_jax.config import apply_common_args, parse_arg\n\n\n"
        "def get_config(arg=None):\n"
        f"    c = ml_collections.ConfigDict({cfg.to_dict()!r})\n"
        "    return apply_common_args(c, parse_arg(arg))\n"
    )
    workdir = root / "cmp"
    killed = compare.run_dir(workdir, METHODS[0], SEEDS[0])
    command = [
        sys.executable,
        "-m",
        "recyclelora_jax.compare",
        f"--config={config_file}",
        f"--methods={','.join(METHODS)}",
        f"--seeds={','.join(map(str, SEEDS))}",
        f"--workdir={workdir}",
        f"--baseline={BASELINE}",
    ]
    with process_group(command, cwd=root, stdout=open(root / "cli.log", "w"), stderr=-2) as cli:
        deadline = time.time() + 300
        while not (killed / "checkpoints" / "2").is_dir():
            assert cli.poll() is None, (root / "cli.log").read_text()[-3000:]
            assert time.time() < deadline, "the first run never checkpointed step 2"
            time.sleep(0.02)
        os.killpg(cli.pid, signal.SIGKILL)
        cli.wait()
    steps_at_kill = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.is_dir())
    second = _compare(config_file, workdir)
    third = _compare(config_file, workdir)
    return dict(
        config_file=config_file,
        workdir=workdir,
        cli_log=(root / "cli.log").read_text(),
        steps_at_kill=steps_at_kill,
        second=second,
        third=third,
    )


def _rows(workdir, method, seed):
    path = compare.run_dir(workdir, method, seed) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _final_miou(workdir, method, seed):
    return [r for r in _rows(workdir, method, seed) if "miou" in r][-1]["miou"]


def test_the_killed_run_resumes_and_finished_runs_are_skipped(comparison):
    c = comparison
    assert f"[1/{RUNS}] recyclelora seed 0: training in" in c["cli_log"]
    assert "done in" not in c["cli_log"], "killed too late: the first run had finished"
    assert c["steps_at_kill"] == [2]
    assert f"[1/{RUNS}] recyclelora seed 0: training (resuming)" in c["second"]
    for i, (m, s) in enumerate([(m, s) for m in METHODS for s in SEEDS], 1):
        if i > 1:
            assert f"[{i}/{RUNS}] {m} seed {s}: training in" in c["second"]
        assert f"[{i}/{RUNS}] {m} seed {s}: finished earlier, skipped" in c["third"]
        steps = [r["step"] for r in _rows(c["workdir"], m, s) if "loss" in r]
        assert steps == list(range(1, STEPS + 1)), "every step logged once"
    assert "training" not in c["third"]


def test_outputs_hold_the_runs_numbers(comparison):
    workdir = comparison["workdir"]
    got = json.loads((workdir / "comparison.json").read_text())
    runs = {m: [_final_miou(workdir, m, s) for s in SEEDS] for m in METHODS}
    for m in METHODS:
        for d in ("synthetic", "photo"):
            values = np.array([r[d] for r in runs[m]])
            assert got[m][d]["runs"] == pytest.approx(values.tolist(), abs=1e-12)
            assert got[m][d]["mean"] == pytest.approx(values.mean(), abs=1e-12)
            assert got[m][d]["std"] == pytest.approx(values.std(ddof=1), abs=1e-12)
        # The only target is "photo": "synthetic" is read by the training source's builder.
        assert got[m]["target_mean"]["runs"] == got[m]["photo"]["runs"]
        times = [
            np.median([r["step_time"] for r in _rows(workdir, m, s) if "step_time" in r][1:])
            for s in SEEDS
        ]
        assert got[m]["step_time_s"] == pytest.approx(np.mean(times), rel=1e-12)
    # Paired same-seed differences to the baseline and their 95 % t intervals, every dataset.
    # After four steps the adapters change the source predictions, not (yet) all target ones.
    intervals = {}
    for d in ("synthetic", "photo"):
        diff = np.array(
            [a[d] - b[d] for a, b in zip(runs["recyclelora"], runs[BASELINE], strict=True)]
        )
        if d == "synthetic":
            assert np.ptp(diff) > 0, "degenerate runs: the interval would not be tested"
        sem = stats.sem(diff)
        ci = stats.t.interval(0.95, len(diff) - 1, diff.mean(), sem) if sem else (diff.mean(),) * 2
        intervals[d] = ci
        got_diff = got["recyclelora"][d]["diff"]
        assert got_diff["baseline"] == BASELINE and got_diff["n"] == len(SEEDS)
        assert got_diff["mean"] == pytest.approx(diff.mean(), abs=1e-12)
        assert got_diff["ci95"] == pytest.approx(list(ci), abs=1e-9)
        assert "diff" not in got[BASELINE][d]
    assert got["recyclelora"]["target_mean"]["diff"] == got["recyclelora"]["photo"]["diff"]
    low, high = intervals["photo"]
    diff_mean = got["recyclelora"]["photo"]["diff"]["mean"]

    with (workdir / "comparison.csv").open() as f:
        rows = {(r["method"], r["dataset"]): r for r in csv.DictReader(f)}
    row = rows["recyclelora", "target_mean"]
    assert float(row["mean"]) == pytest.approx(got["recyclelora"]["target_mean"]["mean"])
    assert float(row["diff_ci95_low"]) == pytest.approx(low)
    assert float(row["diff_ci95_high"]) == pytest.approx(high)
    assert [float(row[f"seed_{s}"]) for s in SEEDS] == pytest.approx(
        [r["photo"] for r in runs["recyclelora"]]
    )
    table = (workdir / "comparison.md").read_text()
    mean, std = got[BASELINE]["photo"]["mean"], got[BASELINE]["photo"]["std"]
    assert f"| {BASELINE} | " in table and f"{mean:.2f} ± {std:.2f}" in table
    assert f"{diff_mean:+.2f} [{low:+.2f}, {high:+.2f}]" in table
    for png in ("bars.png", "loss.png", "params.png"):
        assert (workdir / png).stat().st_size > 10_000, png


def test_costs_and_adapter_analyses_from_the_checkpoints(comparison):
    workdir = comparison["workdir"]
    got = json.loads((workdir / "comparison.json").read_text())
    analysis = json.loads((workdir / "analysis.json").read_text())
    size = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
    for m in METHODS:
        model, params, _ = restore_run(compare.run_dir(workdir, m, 0))
        head = size(params["head"])
        adapters = size({k: v for k, v in _adapter_leaves(params["backbone"])})
        assert got[m]["trainable_params"] == head + adapters
        assert got[m]["trainable_backbone_params"] == adapters
        assert got[m]["step_memory_bytes"] > 4 * got[m]["trainable_params"]
    assert got["frozen"]["trainable_backbone_params"] == 0
    assert analysis["frozen"] == {"0": {}, "1": {}}
    for s in SEEDS:
        model, params, _ = restore_run(compare.run_dir(workdir, "recyclelora", s))
        trained = jax.device_get(params["backbone"])
        a = analysis["recyclelora"][str(s)]
        for name in ("main", "sub"):
            ranks = []
            for path, _ in model.backbone.adapters:
                layer = trained
                for part in path.split("/"):
                    layer = layer[part]
                pair = layer[f"adapter_{name}"]
                update = np.asarray(pair["a"], np.float64) @ np.asarray(pair["b"], np.float64)
                ranks.append(effective_rank(np.linalg.svd(update, compute_uv=False)))
            assert a[f"effective_rank_{name}"] == pytest.approx(np.mean(ranks), rel=1e-6)
        assert 0 < a["effective_rank_sub"] <= 2 + 1e-9  # smoke ranks: main 4, sub 2
        assert 0 <= a["grassmann_main_sub"] <= np.sqrt(2) * np.pi / 2  # 2 principal angles
        assert a["init_column_norm_ratio"] > 0
        assert got["recyclelora"]["init_column_norm_ratio"] == pytest.approx(
            np.mean([analysis["recyclelora"][str(k)]["init_column_norm_ratio"] for k in SEEDS])
        )


def _adapter_leaves(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _adapter_leaves(v, f"{prefix}{k}/")
        elif "adapter_" in prefix:
            yield prefix + k, v


def test_a_run_directory_of_another_config_is_refused(comparison):
    c = comparison
    with pytest.raises(ValueError, match="use another --workdir"):
        _compare(c["config_file"], c["workdir"], {"optim.lr": 0.5})


def test_method_and_seed_come_from_the_flags(comparison):
    with pytest.raises(ValueError, match="--methods/--seeds choose them"):
        compare.run_config(f"{comparison['config_file']}:seed=3", {}, "lora", 0)
    cfg = compare.run_config(str(comparison["config_file"]), {"train.steps": 7}, "lora", 1)
    assert (cfg.method, cfg.seed, cfg.train.steps) == ("lora", 1, 7)


def test_feature_change_figures_of_a_trained_run(comparison, tmp_path):
    """`analysis --run --image` on a comparison's trained run: one PNG per adapter, and the
    explained-variance ratios of the change that removing each adapter's branch makes."""
    run = compare.run_dir(comparison["workdir"], "recyclelora", 0)
    pixels = np.random.default_rng(5).integers(0, 256, (52, 100, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "street.png")
    out = tmp_path / "fig"
    args = ["--run", str(run), "--image", str(tmp_path / "street.png"), "--out", str(out)]
    summary = analysis.main(args)
    model, params, _ = restore_run(run)
    trained = jax.device_get(params["backbone"])
    image = normalize(pixels[:48, :96])[None]  # cut to whole 8-px patches
    full = model.backbone.apply({"params": trained}, image)["features"][-1][0]
    for name in ("main", "sub"):
        assert (out / f"feature_change_{name}.png").stat().st_size > 10_000
        without = jax.tree.map(lambda x: x, trained)
        for path, _ in model.backbone.adapters:
            pair = analysis._layer(without, path)[f"adapter_{name}"]
            pair["b"] = np.zeros_like(pair["b"])
        rest = model.backbone.apply({"params": without}, image)["features"][-1][0]
        change = np.asarray(full, np.float64) - np.asarray(rest, np.float64)
        change = change.reshape(-1, change.shape[-1])
        s = np.linalg.svd(change - change.mean(0), compute_uv=False)
        ratios = summary["feature_change"][name]
        np.testing.assert_allclose(ratios, s[:3] ** 2 / (s**2).sum(), rtol=1e-6)
    saved = json.loads((out / "feature_change.json").read_text())
    assert saved == summary
    with pytest.raises(ValueError, match="has no adapters"):
        analysis.feature_change_figures(
            compare.run_dir(comparison["workdir"], "frozen", 0), tmp_path / "street.png", out
        )
