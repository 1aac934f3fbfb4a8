"""Evaluate a trained segmentor: ``python eval.py --workdir runs/x`` (latest checkpoint) or
``--checkpoint runs/x/checkpoints/4000`` or ``--checkpoint model.safetensors`` (an export), or a
checkpoint of the official PyTorch code: ``--checkpoint iter_40000.pth`` (the g2cbm targets).

Prints the per-class IoU table of every target dataset of the run's config (sliding window
512/341 by default) and writes ``eval.json`` (per-dataset ``miou``, per-class ``iou``,
``mean_miou``). ``--export`` writes the merged inference model; ``--images DIR`` segments your
own images; ``--save_predictions N`` draws image | label | prediction for N images per dataset.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (latest checkpoint).")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint",
    None,
    "A checkpoint step directory of a run, an exported .safetensors file, or a checkpoint of "
    "the official code (mmseg .pth, or its state dict as .safetensors).",
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where the TFDS datasets are (default: config).")
_OUT = flags.DEFINE_string("out", None, "Where to write eval.json and pictures (default: run dir).")
_DATASETS = flags.DEFINE_list(
    "datasets", None, "Evaluate only these of the config's datasets (by display name)."
)
_MAX_IMAGES = flags.DEFINE_integer("max_images", None, "Images per dataset (default: config).")
_MODE = flags.DEFINE_enum("mode", None, ["slide", "whole"], "Inference mode (default: config).")
_SAVE_PREDICTIONS = flags.DEFINE_integer(
    "save_predictions", 0, "Save an image | label | prediction PNG of this many images per dataset."
)
_EXPORT = flags.DEFINE_string("export", None, "Also write the merged inference model to this file.")
_IMAGES = flags.DEFINE_string(
    "images", None, "Segment every image in this folder instead of the datasets."
)
_NATIVE = flags.DEFINE_bool(
    "native_size", False, "--images at their own size (default: the Cityscapes test scale)."
)
_ALLOW = flags.DEFINE_bool(
    "allow_other_base", False, "Use a frozen base other than the one the run was trained on."
)
_SKIP_EVAL = flags.DEFINE_bool("skip_eval", False, "Only export / segment images.")


def _is_official(path: Path) -> bool:
    """A checkpoint of the official code: a .pth, or a .safetensors that is not our export."""
    if path.suffix in (".pth", ".pt"):
        return True
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    import safetensors

    from recyclelora_jax.export import FORMAT_TAG

    with safetensors.safe_open(str(path), framework="numpy") as f:
        return (f.metadata() or {}).get("format") != FORMAT_TAG


def _load():
    from recyclelora_jax.export import load_export, restore_run

    if _CHECKPOINT.value and _is_official(Path(_CHECKPOINT.value)):
        from recyclelora_jax import load_mmseg_checkpoint
        from recyclelora_jax.config import base_config

        path = Path(_CHECKPOINT.value)
        model, params = load_mmseg_checkpoint(path)
        return model, params, base_config(), path.parent
    if _CHECKPOINT.value and _CHECKPOINT.value.endswith(".safetensors"):
        path = Path(_CHECKPOINT.value)
        model, params, cfg = load_export(path)
        return model, params, cfg, path.parent
    if _CHECKPOINT.value:
        step_dir = Path(_CHECKPOINT.value)
        workdir = step_dir.parent.parent
        model, params, cfg = restore_run(workdir, int(step_dir.name), allow_other_base=_ALLOW.value)
        return model, params, cfg, workdir
    if not _WORKDIR.value:
        raise app.UsageError("give --workdir or --checkpoint")
    workdir = Path(_WORKDIR.value)
    model, params, cfg = restore_run(workdir, allow_other_base=_ALLOW.value)
    return model, params, cfg, workdir


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from recyclelora_jax import runner
    from recyclelora_jax.evaluate import own_images
    from recyclelora_jax.evaluate.metrics import format_table
    from recyclelora_jax.evaluate.suite import PredictionSaver, eval_sets, evaluate_suite
    from recyclelora_jax.export import merge_segmentor, save_export

    runner.quiet_library_logs()
    model, params, cfg, workdir = _load()
    out = Path(_OUT.value) if _OUT.value else workdir
    out.mkdir(parents=True, exist_ok=True)
    if _EXPORT.value:
        save_export(_EXPORT.value, model, params, cfg)
        print(f"merged inference model written to {_EXPORT.value}")
    cfg = cfg.unlock()
    if _DATA_DIR.value:
        cfg.data.data_dir = _DATA_DIR.value
    if _MAX_IMAGES.value is not None:
        cfg.eval.max_images = _MAX_IMAGES.value
    if _MODE.value:
        cfg.eval.mode = _MODE.value
    model, params = merge_segmentor(model, params)  # evaluate what would be deployed
    if _IMAGES.value:
        scale = None if _NATIVE.value else own_images.TEST_SCALE
        written = own_images.segment_folder(
            model, params, cfg, _IMAGES.value, out / "images", scale=scale
        )
        print(f"{len(written)} segmentations written to {out / 'images'}")
    if _SKIP_EVAL.value or _IMAGES.value:
        return
    sets = eval_sets(cfg)
    if _DATASETS.value:
        unknown = sorted(set(_DATASETS.value) - {s.name for s in sets})
        if unknown:
            raise app.UsageError(f"--datasets {unknown} not in {[s.name for s in sets]}")
        sets = [s for s in sets if s.name in _DATASETS.value]
    saver = PredictionSaver(_SAVE_PREDICTIONS.value) if _SAVE_PREDICTIONS.value else None
    results = evaluate_suite(model, params, cfg, sets, on_prediction=saver)
    print(format_table(results))
    (out / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {out / 'eval.json'}")
    if saver is not None and saver.save(out / "predictions.png"):
        print(f"predictions written to {out / 'predictions.png'}")


if __name__ == "__main__":
    app.run(main)
