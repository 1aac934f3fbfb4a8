"""UrbanSyn (`dg_urbansyn`) from its download layout, and configs/gsu2cbm.py's three sources."""

from __future__ import annotations

import importlib.util

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds
from train_helpers import REPO

from recyclelora_jax.config import data_sources
from recyclelora_jax.data import codecs, synthetic
from recyclelora_jax.data.labels import IGNORE
from recyclelora_jax.data.pipeline import Source, make_train_loader
from recyclelora_jax.data.prepare import prepare


def _write_urbansyn(root, n=3, rng=None):
    """`rgb/rgb_NNNN.png` and `ss/ss_NNNN.png` (grey train ids 0-18, 19 unlabelled)."""
    rng = rng or np.random.default_rng(0)
    (root / "rgb").mkdir(parents=True)
    (root / "ss").mkdir(parents=True)
    raw = {}
    for i in range(1, n + 1):
        cv2.imwrite(str(root / "rgb" / f"rgb_{i:04d}.png"), rng.integers(0, 256, (24, 40, 3)))
        ss = rng.integers(0, 20, (24, 40)).astype(np.uint8)
        cv2.imwrite(str(root / "ss" / f"ss_{i:04d}.png"), ss)
        raw[f"rgb_{i:04d}.png"] = ss
    return raw


def test_urbansyn_builds_from_its_layout_with_19_as_ignore(tmp_path):
    raw = _write_urbansyn(tmp_path / "urbansyn")
    prepare("dg_urbansyn", tmp_path / "urbansyn", tmp_path / "tfds", num_workers=1)
    seen = set()
    for ex in tfds.data_source("dg_urbansyn", split="train", data_dir=str(tmp_path / "tfds")):
        name = ex["file_name"].decode()
        want = np.where(raw[name] == 19, IGNORE, raw[name])
        assert np.array_equal(codecs.decode_label(ex["label"]), want), name
        assert ex["image"] == (tmp_path / "urbansyn" / "rgb" / name).read_bytes()
        seen.add(name)
    assert seen == set(raw)


def test_urbansyn_layout_errors_name_the_file(tmp_path):
    raw = _write_urbansyn(tmp_path / "missing", n=2)
    (tmp_path / "missing" / "ss" / "ss_0002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"rgb_0002\.png: no label file .*ss_0002\.png"):
        prepare("dg_urbansyn", tmp_path / "missing", tmp_path / "tfds1", num_workers=1)
    _write_urbansyn(tmp_path / "bad", n=1)
    cv2.imwrite(str(tmp_path / "bad" / "ss" / "ss_0001.png"), np.full((24, 40), 33, np.uint8))
    with pytest.raises(
        ValueError, match=r"ss_0001\.png: label values \[33\] are not in the UrbanSyn"
    ):
        prepare(
            "dg_urbansyn", tmp_path / "bad", tmp_path / "tfds2", num_workers=1, strict_labels=True
        )
    assert len(raw) == 2


def test_gsu2cbm_reads_gtav_synthia_and_urbansyn(tmp_path):
    """The config's own source list, each dataset built from its layout, yields training
    batches drawn from all three."""
    synthetic.write_gtav(tmp_path / "gtav", 4, size=(64, 32))
    synthia = tmp_path / "synthia"
    (synthia / "RGB").mkdir(parents=True)
    (synthia / "GT" / "LABELS").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(4):  # 16-bit colour PNG, class id in the first channel
        cv2.imwrite(str(synthia / "RGB" / f"{i:07d}.png"), rng.integers(0, 256, (32, 64, 3)))
        ids = rng.integers(0, 23, (32, 64))
        label = np.stack([np.zeros_like(ids), np.zeros_like(ids), ids], -1).astype(np.uint16)
        cv2.imwrite(str(synthia / "GT" / "LABELS" / f"{i:07d}.png"), label)
    _write_urbansyn(tmp_path / "urbansyn", n=4)
    for name in ("gtav", "synthia", "urbansyn"):
        prepare(f"dg_{name}", tmp_path / name, tmp_path / "tfds", num_workers=1)
    spec = importlib.util.spec_from_file_location("gsu2cbm", REPO / "configs" / "gsu2cbm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    sources = [
        Source(s["builder"], s["split"], str(tmp_path / "tfds"), s["subset"])
        for s in data_sources(cfg)
    ]
    assert [s.builder for s in sources] == ["dg_gtav", "dg_synthia", "dg_urbansyn"]
    # One batch of all 12 records: 4 from each source.
    loader = make_train_loader(sources, batch_size=12, crop_size=(32, 32), seed=0)
    batch = next(iter(loader))
    assert batch["image"].shape == (12, 32, 32, 3)
    values = set(np.unique(batch["label"]).tolist())
    assert values <= {*range(19), IGNORE} and len(values) > 5
