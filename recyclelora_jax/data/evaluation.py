"""Evaluation input: test-time keep-ratio resize per target dataset, batches of equal shapes,
labels at their stored (original) resolution for scoring."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from recyclelora_jax.data import codecs, transforms
from recyclelora_jax.data.convert import halve


@dataclasses.dataclass(frozen=True)
class EvalProfile:
    """`scale`: (long, short) bound of mmseg `Resize(keep_ratio=True)` (None: no resize);
    `halve`: first halve image and label (Mapillary's protocol on a full-resolution build)."""

    scale: tuple[int, int] | None
    halve: bool = False


PROFILES = {
    "cityscapes": EvalProfile((2048, 1024)),
    "bdd100k": EvalProfile((1280, 720)),
    "mapillary": EvalProfile((2048, 1024), halve=True),
    "mapillary_half": EvalProfile((2048, 1024)),
    "native": EvalProfile(None),
}
DEFAULT_PROFILES = {
    "dg_cityscapes": "cityscapes",
    "dg_acdc": "cityscapes",
    "dg_bdd100k": "bdd100k",
    "dg_mapillary": "mapillary",
    "dg_mapillary/full": "mapillary",
    "dg_mapillary/half": "mapillary_half",
}


def profile_for(builder_name: str, profile: str | EvalProfile | None = None) -> EvalProfile:
    """The given profile, or the reference's for this dataset (`native` for unknown ones)."""
    if isinstance(profile, EvalProfile):
        return profile
    name = profile or DEFAULT_PROFILES.get(
        builder_name, DEFAULT_PROFILES.get(builder_name.split("/")[0], "native")
    )
    if name not in PROFILES:
        raise ValueError(f"unknown evaluation profile {name!r}; choose from {sorted(PROFILES)}")
    return PROFILES[name]


def load_eval_example(example: dict, profile: EvalProfile) -> dict:
    """Decodes one stored example into a normalised, test-resized image and its label."""
    name = example["file_name"]
    name = name.decode() if isinstance(name, bytes) else name
    image = codecs.decode_image(example["image"], name)
    label = codecs.decode_label(example["label"], name)
    if profile.halve:
        image, label = halve(image, label)
    if profile.scale is not None:
        size = transforms.keep_ratio_size(*label.shape, profile.scale)
        image, _ = transforms.resize(image, None, size)
    return {
        "image": transforms.normalize(image),
        "label": label.astype(np.int32),
        "file_name": name,
    }


def eval_batches(
    builder_name: str,
    split: str,
    data_dir: str,
    *,
    dataset_profile: str | EvalProfile | None = None,
    batch_size: int = 1,
    shard_index: int = 0,
    shard_count: int = 1,
) -> Iterator[dict]:
    """Yields {"image": (b, H, W, 3), "label": (b, h, w) int32, "file_name": [b]} in stored order,
    consecutive examples of equal shapes batched together (up to `batch_size`).

    With `shard_count` > 1 each shard reads a contiguous, disjoint slice of the split.
    """
    profile = profile_for(builder_name, dataset_profile)
    source = tfds.data_source(builder_name, split=split, data_dir=data_dir)
    n = len(source)
    start, stop = n * shard_index // shard_count, n * (shard_index + 1) // shard_count
    pending: list[dict] = []
    for i in range(start, stop):
        example = load_eval_example(source[i], profile)
        shapes = (example["image"].shape, example["label"].shape)
        if pending and (len(pending) == batch_size or shapes != _shapes(pending[0])):
            yield _stack(pending)
            pending = []
        pending.append(example)
    if pending:
        yield _stack(pending)


def _shapes(example: dict) -> tuple:
    return example["image"].shape, example["label"].shape


def _stack(examples: list[dict]) -> dict:
    return {
        "image": np.stack([e["image"] for e in examples]),
        "label": np.stack([e["label"] for e in examples]),
        "file_name": [e["file_name"] for e in examples],
    }
