"""Plants one-line bugs in a copy of the repository and checks that the tests concerned catch them.

Each mutation names the claim of docs/DESIGN.md it breaks, the file, the exact original line
(stripped of indentation; it must occur exactly once, so a refactor that moves or rewrites it
fails loudly instead of silently testing nothing) and its replacement, plus the tests that concern
it. A mutation is *caught* when those tests fail. Run from the repository root:

    python tools/mutation_check.py            # every mutation
    python tools/mutation_check.py -k hue     # the ones whose name contains "hue"
    python tools/mutation_check.py --list

Exit status 0 only if every selected mutation is caught and the unmutated copy passes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    claim: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]


MUTATIONS = (
    Mutation(
        "photometric-brightness-120",
        "training augmentation is mmseg's PhotoMetricDistortion (brightness ±32)",
        "recyclelora_jax/data/transforms.py",
        "img = _convert(img, beta=rng.uniform(-32, 32))",
        "img = _convert(img, beta=rng.uniform(-120, 120))",
        ("tests/test_data_augment.py",),
    ),
    Mutation(
        "photometric-hue-90",
        "training augmentation is mmseg's PhotoMetricDistortion (hue an integer in [-18, 18))",
        "recyclelora_jax/data/transforms.py",
        "hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + int(rng.integers(-18, 18))) % 180",
        "hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + int(rng.integers(-90, 90))) % 180",
        ("tests/test_data_augment.py",),
    ),
    Mutation(
        "photometric-contrast-always-first",
        "photometric order: contrast before or after saturation/hue by a fair coin",
        "recyclelora_jax/data/transforms.py",
        "if not contrast_first and rng.integers(2):",
        "if False:",
        ("tests/test_data_augment.py",),
    ),
    Mutation(
        "test-resize-truncates",
        "evaluation resize is mmcv's keep-ratio rescale (rounded, not truncated)",
        "recyclelora_jax/data/transforms.py",
        "return int(h * factor + 0.5), int(w * factor + 0.5)",
        "return int(h * factor), int(w * factor)",
        ("tests/test_data_eval.py",),
    ),
    Mutation(
        "train-resize-truncates",
        "train resize is mmseg's shortest-edge resize (rounded)",
        "recyclelora_jax/data/transforms.py",
        "return int(new_h + 0.5), int(new_w + 0.5)",
        "return int(new_h), int(new_w)",
        ("tests/test_data_augment.py",),
    ),
    Mutation(
        "attention-softmax-bf16",
        "attention logits and softmax statistics in float32 whatever the compute dtype",
        "recyclelora_jax/models/dinov2.py",
        "logits = ((q * q.shape[-1] ** -0.5) @ k.swapaxes(-1, -2)).astype(jnp.float32)",
        "logits = (q * q.shape[-1] ** -0.5) @ k.swapaxes(-1, -2)",
        ("tests/test_dinov2.py::test_bfloat16_attention_is_float32_softmax",),
    ),
    Mutation(
        "svd-init-unbalanced",
        "PiSSA/MiLoRA/SoMA split sqrt(S) evenly between A and B",
        "recyclelora_jax/peft/init.py",
        "a = np.ascontiguousarray((root[:, None] * vh[idx]).T)",
        "a = np.ascontiguousarray((root[:, None] ** 2 * vh[idx]).T); root = np.ones_like(root)",
        ("tests/test_peft_init.py",),
    ),
    Mutation(
        "decoder-qkv-init-unfused",
        "Mask2Former init as mmdet: q/k/v xavier-normal over the fused (3C, C) in-projection",
        "recyclelora_jax/models/mask2former.py",
        "split = lambda t, name: dense(name, _in_proj_normal)(t).reshape(",
        "split = lambda t, name: dense(name, _xavier_normal)(t).reshape(",
        ("tests/test_mask2former_init.py",),
    ),
    Mutation(
        "unknown-labels-uncounted",
        "label values outside a table are counted per file and summarised",
        "recyclelora_jax/data/convert.py",
        "unknown = {} if task.strict_labels else task.table.unknown(raw)",
        "unknown = {}",
        ("tests/test_data_bad_input.py",),
    ),
    Mutation(
        "strict-labels-ignored",
        "--strict_labels stops at a file holding a value outside the table",
        "recyclelora_jax/data/convert.py",
        "label = task.table.map(raw, str(pair.label), strict=task.strict_labels)",
        "label = task.table.map(raw, str(pair.label))",
        ("tests/test_data_bad_input.py",),
    ),
    Mutation(
        "stale-chunk-reused",
        "a cached chunk from before the count that skipped files is converted again",
        "recyclelora_jax/data/convert.py",
        'if "unknown" not in info and skipped:',
        "if False:",
        ("tests/test_data_bad_input.py",),
    ),
    Mutation(
        "official-lone-sub-adapter-dropped",
        "an official checkpoint with only lora_*_sub keys imports as a lone sub adapter",
        "recyclelora_jax/official.py",
        'if layout_kind == "linear" and f"{layer}.lora_A_{official}" in state',
        'if layout_kind == "linear" and f"{layer}.lora_A_main" in state',
        ("tests/test_official.py::test_exports_round_trip_kept_and_merged",),
    ),
    Mutation(
        "synthia-wall-unmapped",
        "SYNTHIA maps its 16 Cityscapes classes (wall is SYNTHIA id 21)",
        "recyclelora_jax/data/labels.py",
        "3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10, 10: 11, 17: 12, 8: 13, "
        "19: 15,",
        "3: 0, 4: 1, 2: 2, 22: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10, 10: 11, 17: 12, 8: 13, "
        "19: 15,",
        ("tests/test_data_labels.py",),
    ),
    Mutation(
        "grad-accum-first-micro-batch",
        "gradient accumulation averages the gradients of all micro-batches",
        "recyclelora_jax/train/trainer.py",
        "total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum), *micro))",
        "total = jax.tree.map(lambda x: accum * x, grad_fn(trainable, frozen, micro[0][0], "
        "micro[1][0], rng))",
        ("tests/test_train.py::test_gradient_accumulation_equals_the_full_batch",),
    ),
    Mutation(
        "resumed-log-keeps-killed-rows",
        "a resumed run's metrics.jsonl reads as one uninterrupted run",
        "recyclelora_jax/train/metrics_log.py",
        "kept = [r for r in path.read_text().splitlines() if _row_step(r) <= resume_step]",
        "kept = path.read_text().splitlines()",
        ("tests/test_train.py::test_resumed_metrics_log_equals_the_uninterrupted_one",),
    ),
    Mutation(
        "nan-step-reaches-state",
        "a non-finite loss never reaches the parameters or the optimizer state",
        "recyclelora_jax/train/trainer.py",
        "finite = jnp.isfinite(loss)",
        "finite = True",
        ("tests/test_train.py::test_non_finite_loss_after_step_1_keeps_the_good_state",),
    ),
    Mutation(
        "sub-group-main-lr",
        "the sub adapter trains at lr ×0.5 (the recipe), weight decay 0",
        "recyclelora_jax/config.py",
        "sub=dict(lr_mult=0.5, weight_decay=False),",
        "sub=dict(lr_mult=1.0, weight_decay=False),",
        ("tests/test_optim.py::test_train_groups_of_every_method_follow_the_recipe",),
    ),
    Mutation(
        "head-norms-decayed",
        "head norms have no weight decay",
        "recyclelora_jax/config.py",
        '(r"^head/.*norm", "head_no_decay"),',
        '(r"^head/.*norm_", "head_no_decay"),',
        ("tests/test_optim.py::test_train_groups_of_every_method_follow_the_recipe",),
    ),
    Mutation(
        "swapped-is-recyclelora",
        "the swapped ablation takes main from the major RRQR directions",
        "recyclelora_jax/peft/init.py",
        'lambda k, ranks, alpha, seed: recyclelora_swapped(k, ranks["main"], ranks["sub"], alpha),',
        'lambda k, ranks, alpha, seed: recyclelora(k, ranks["main"], ranks["sub"], alpha),',
        ("tests/test_optim.py::test_ablation_plans_take_their_directions",),
    ),
    Mutation(
        "register-weights-get-config-offset",
        "a register checkpoint keeps its own interpolation (size form, antialiased) unless the "
        "config sets interpolate_offset",
        "recyclelora_jax/build.py",
        "interpolate_offset=b.interpolate_offset,",
        "interpolate_offset=0.1 if b.interpolate_offset is None else b.interpolate_offset,",
        ("tests/test_configs.py::test_register_weights_keep_their_own_interpolation",),
    ),
    Mutation(
        "register-default-not-antialiased",
        "register models default to the size form with antialias (official hub, transformers)",
        "recyclelora_jax/convert.py",
        "return (0.0, True) if arch.num_register_tokens else (0.1, False)",
        "return (0.1, False)",
        ("tests/test_dinov2.py::test_registers_default_to_antialiased_size_form",),
    ),
    Mutation(
        "mapillary-halving-rounds-up",
        "Mapillary halving is the official tool: (W // 2, H // 2)",
        "recyclelora_jax/data/convert.py",
        "size = (w // 2, h // 2)",
        "size = ((w + 1) // 2, (h + 1) // 2)",
        ("tests/test_data_eval.py::test_mapillary_halving_is_the_official_tool",),
    ),
    Mutation(
        "poly-lr-linear",
        "LR: lr·mult·(1 − t/T)^0.9",
        "recyclelora_jax/train/optim.py",
        "value = peak * (left / decay_steps) ** cfg.lr_power",
        "value = peak * (left / decay_steps)",
        ("tests/test_optim.py::test_schedules_equal_torch_recursions_and_closed_forms",),
    ),
    Mutation(
        "adamw-without-decay",
        "AdamW as torch: decoupled weight decay scaled by the group lr",
        "recyclelora_jax/train/optim.py",
        "optax.add_decayed_weights(cosine_wd(cfg, start)),",
        "optax.identity(),",
        ("tests/test_optim.py::test_three_steps_frozen_untouched_groups_use_their_lr",),
    ),
    Mutation(
        "ema-ignores-begin-step",
        "EMA as mmengine: a copy until begin_step, then ema += m (p − ema)",
        "recyclelora_jax/train/optim.py",
        "started = jnp.asarray(step) >= begin_step",
        "started = jnp.asarray(step) >= 0",
        ("tests/test_optim.py::test_ema_follows_mmengine_begin_iter",),
    ),
    Mutation(
        "merge-without-scale",
        "merge folds s·Σ a b into the kernel (the merged model predicts as the adapted one)",
        "recyclelora_jax/peft/params.py",
        "return spec.scale * total",
        "return total",
        ("tests/test_peft_params.py::test_merge_equals_adapted_and_loads_into_plain_backbone",),
    ),
    Mutation(
        "slide-logits-summed-not-averaged",
        "sliding-window logits are divided by the per-pixel window count (mmseg's count_mat)",
        "recyclelora_jax/evaluate/inference.py",
        "return total / jnp.asarray(counts, jnp.float32)[None, :, :, None]",
        "return total",
        ("tests/test_evaluate_inference.py::test_slide_inference_matches_mmseg_loop",),
    ),
    Mutation(
        "iou-union-counts-tp-twice",
        "IoU = TP / (TP + FP + FN) as cityscapesscripts",
        "recyclelora_jax/evaluate/metrics.py",
        "union = conf.sum(axis=0) + conf.sum(axis=1) - tp",
        "union = conf.sum(axis=0) + conf.sum(axis=1)",
        ("tests/test_evaluate_metrics.py::test_confusion_and_miou_match_cityscapesscripts",),
    ),
)


def _copy_repo(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def _mutated(root: Path, m: Mutation) -> str:
    """The text of `m.file` under `root` with the mutation applied (indentation kept)."""
    path = root / m.file
    if not path.is_file():
        raise SystemExit(f"{m.name}: file not found: {m.file}")
    lines = path.read_text().split("\n")
    hits = [i for i, line in enumerate(lines) if line.strip() == m.original.strip()]
    if len(hits) != 1:
        raise SystemExit(f"{m.name}: pattern found {len(hits)} times in {m.file}: {m.original!r}")
    line = lines[hits[0]]
    lines[hits[0]] = line[: len(line) - len(line.lstrip())] + m.replacement.strip()
    return "\n".join(lines)


def _pytest(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[int | None, str]:
    """Runs pytest -x on `tests` in `root`; kills the whole process group on timeout. All runs
    share one compilation cache (its keys ignore file paths): a mutation recompiles only what it
    changes."""
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(root.parent / "jax-cache")
    env = dict(
        os.environ,
        PYTHONPATH=str(root),
        PYTHONDONTWRITEBYTECODE="1",
        JAX_COMPILATION_CACHE_DIR=cache,
    )
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    proc = subprocess.Popen(
        cmd,
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out
    return proc.returncode, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "-k", default="", help="only mutations whose name contains one of these (comma-separated)"
    )
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per pytest run")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    args = parser.parse_args()
    keys = args.k.split(",")
    selected = [m for m in MUTATIONS if any(k in m.name for k in keys)]
    if args.list:
        for m in selected:
            _mutated(REPO, m)  # fails loudly on a pattern that moved
            print(f"{m.name:36} {m.file}: {m.claim}")
        return 0
    failures = 0
    with tempfile.TemporaryDirectory(prefix="mutation_") as tmp:
        clean = Path(tmp) / "clean"
        _copy_repo(clean)
        mutated = {m.name: _mutated(clean, m) for m in selected}  # all patterns before any run
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(t for m in selected for t in m.tests))
            rc, out = _pytest(clean, tests, args.timeout * 2)
            if rc != 0:
                print(out[-3000:])
                print(f"baseline: the unmutated tests do not pass (rc {rc})")
                return 1
            print(f"baseline: {len(tests)} test targets pass unmutated")
        for m in selected:
            work = Path(tmp) / m.name
            shutil.copytree(clean, work)
            (work / m.file).write_text(mutated[m.name])
            start = time.monotonic()
            rc, out = _pytest(work, m.tests, args.timeout)
            took = time.monotonic() - start
            if rc is None:
                verdict = "caught (timeout)"
            elif rc == 1:
                verdict = "caught"
            elif rc == 0:
                verdict, failures = "SURVIVED", failures + 1
            else:  # 2-5: interrupted, internal or usage error, no tests collected
                verdict, failures = f"ERROR (pytest rc {rc})", failures + 1
                print(out[-2000:])
            failed = [line.split()[1] for line in out.splitlines() if line.startswith("FAILED ")]
            print(f"{verdict:18} {m.name:36} {took:6.1f} s  {m.claim}", flush=True)
            if failed:
                print(f"{'':18} by {failed[0]}")
            shutil.rmtree(work, ignore_errors=True)
    print(f"{len(selected) - failures}/{len(selected)} mutations caught")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
