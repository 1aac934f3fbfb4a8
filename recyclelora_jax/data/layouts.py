"""Finds (image, label) pairs in each dataset's official on-disk layout, with clear errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from recyclelora_jax.data.convert import Pair

log = logging.getLogger(__name__)


def require_dir(path: Path, what: str) -> Path:
    """Returns `path`, or raises saying which folder of the layout is missing."""
    if not path.is_dir():
        raise FileNotFoundError(f"wrong layout: expected the {what} folder at {path}")
    return path


def pair_files(
    image_dir: Path,
    label_dir: Path,
    image_suffix: str,
    label_suffix: str,
    *,
    skip_invalid: bool = False,
    prefixes: tuple[str, str] = ("", ""),
) -> list[Pair]:
    """Every `*image_suffix` under `image_dir` (recursively) with the label at the same relative
    path under `label_dir`, its suffix (and name prefix, `prefixes` = (image's, label's))
    replaced; an image without a label is an error (or skipped).
    """
    require_dir(image_dir, "image")
    require_dir(label_dir, "label")
    image_prefix, label_prefix = prefixes
    images = sorted(image_dir.rglob(f"{image_prefix}*{image_suffix}"))
    if not images:
        raise FileNotFoundError(
            f"no '{image_prefix}*{image_suffix}' images found under {image_dir}"
        )
    pairs, missing = [], []
    for image in images:
        rel = image.relative_to(image_dir)
        stem = rel.name[len(image_prefix) : -len(image_suffix)]
        label = label_dir / rel.parent / (label_prefix + stem + label_suffix)
        if label.is_file():
            pairs.append(Pair(image, label, image.name))
        elif skip_invalid:
            missing.append(image)
        else:
            raise FileNotFoundError(f"{image}: no label file {label}")
    if missing:
        log.warning("Skipped %d images without a label, e.g. %s", len(missing), missing[0])
    return pairs


def mapillary_class_names(root: Path) -> list[str]:
    """The v1.2 class names, in id order, from `config_v1.2.json` or `config.json`."""
    for name in ("config_v1.2.json", "config.json"):
        path = root / name
        if path.is_file():
            try:
                return [entry["name"] for entry in json.loads(path.read_text())["labels"]]
            except (KeyError, TypeError, json.JSONDecodeError) as err:
                raise ValueError(f"{path}: not a Vistas config with labels[].name") from err
    raise FileNotFoundError(f"wrong layout: no config_v1.2.json or config.json in {root}")


def mapillary_label_dir(split_dir: Path) -> Path:
    """v1.2 labels: `<split>/v1.2/labels` in the v2.0 download, `<split>/labels` in v1.2's own."""
    nested = split_dir / "v1.2" / "labels"
    return nested if nested.is_dir() else split_dir / "labels"
