"""Faulty dataset inputs and a hostile prepare cache: every bad file is named and skippable, a
lossy label is refused by content, a planted cache file runs nothing, a killed prepare leaves no
`incomplete.*` folder."""

from __future__ import annotations

import logging
import os
import pickle
import sys

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from train_helpers import REPO, run_cli

from recyclelora_jax.data import codecs, convert, synthetic
from recyclelora_jax.data.prepare import prepare


@pytest.fixture
def gtav(tmp_path):
    return synthetic.write_gtav(tmp_path / "gtav", 6, size=(32, 16))


def _prepare(root, tmp_path, **kw):
    return prepare("dg_gtav", root, tmp_path / "tfds", num_workers=1, **kw)


def _jpeg_label(path) -> bytes:
    """The label's ids as a grey JPEG: every decoded value a valid GTAV id, but not the ids."""
    ids = np.asarray(Image.open(path))
    ok, buf = cv2.imencode(".jpg", ids, [cv2.IMWRITE_JPEG_QUALITY, 100])
    assert ok
    return buf.tobytes()


def _truncated(path) -> bytes:
    data = path.read_bytes()
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("file", "damage", "message"),
    [
        ("labels/00002.png", _jpeg_label, r"labels/00002\.png: label content is JPEG; labels must"),
        ("images/00003.png", lambda p: b"", r"images/00003\.png: empty file \(0 bytes\)"),
        ("images/00004.png", _truncated, r"images/00004\.png: not a decodable image \(truncated"),
        ("labels/00005.png", _truncated, r"labels/00005\.png: not a decodable label image"),
        ("labels/00001.png", lambda p: b"", r"labels/00001\.png: label content is not PNG"),
    ],
    ids=["jpeg_label", "empty_image", "truncated_image", "truncated_label", "empty_label"],
)
def test_bad_files_are_named_and_skippable(gtav, tmp_path, caplog, file, damage, message):
    path = gtav / file
    path.write_bytes(damage(path))
    with pytest.raises(ValueError, match=message):
        _prepare(gtav, tmp_path)
    with caplog.at_level(logging.WARNING):
        builder = _prepare(gtav, tmp_path, skip_invalid=True)
    assert builder.info.splits["train"].num_examples == 5
    assert "Skipped 1 invalid files of 6" in caplog.text


def test_sixteen_bit_labels_are_refused(gtav, tmp_path):
    ids = np.asarray(Image.open(gtav / "labels" / "00002.png")).astype(np.uint16)
    cv2.imwrite(str(gtav / "labels" / "00002.png"), ids)
    with pytest.raises(ValueError, match=r"00002\.png: label must be an 8-bit grey or palette"):
        _prepare(gtav, tmp_path)


def test_sixteen_bit_images_are_scaled_to_eight_bits():
    rgb = np.random.default_rng(0).integers(0, 2**16, (5, 7, 3), dtype=np.uint16)
    ok, png = cv2.imencode(".png", rgb[..., ::-1])  # OpenCV writes BGR
    assert ok
    np.testing.assert_array_equal(codecs.decode_image(png.tobytes()), rgb >> 8)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_planted_cache_file_runs_nothing(gtav, tmp_path, monkeypatch, caplog):
    """A pickle planted under the exact name the next prepare looks for (and the old `.pkl`
    format's) is never unpickled: the chunk is converted again."""
    monkeypatch.setattr(convert, "CHUNK_SIZE", 4)
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"examples": _Payload(marker), "skipped": []})
    assert not marker.exists()
    builder = tfds.builder("dg_gtav", data_dir=str(tmp_path / "tfds"))
    pairs, task, cache_dir = builder._conversion(gtav, "train")
    cache_dir.mkdir(parents=True)
    for i, chunk in enumerate((pairs[:4], pairs[4:])):
        key = convert._chunk_key(chunk, task)
        for suffix in ("npz", "pkl"):
            (cache_dir / f"chunk{i:06d}-{key}.{suffix}").write_bytes(payload)
    with caplog.at_level(logging.WARNING):
        _prepare(gtav, tmp_path)
    assert not marker.exists()
    assert caplog.text.count("is unreadable; converting it again") == 2
    source = tfds.data_source("dg_gtav", split="train", data_dir=str(tmp_path / "tfds"))
    assert len(source) == 6
    first = next(e for e in source if e["file_name"] == b"00001.png")
    want = np.asarray(Image.open(gtav / "labels" / "00001.png"))
    got = codecs.decode_label(first["label"])
    np.testing.assert_array_equal(got, task.table.map(want, "00001.png"))


KILL_MID_CONVERSION = """
import os, signal, sys
from recyclelora_jax.data import convert
from recyclelora_jax.data.prepare import main
convert.CHUNK_SIZE = 2
original, calls = convert.convert_pair, []
def dying(pair, task):
    calls.append(pair)
    if len(calls) == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(pair, task)
convert.convert_pair = dying
main(sys.argv[1:])
"""


def test_killed_prepare_leaves_no_incomplete_folder_and_resumes(gtav, tmp_path):
    data_dir = tmp_path / "tfds"
    args = ["dg_gtav", f"--manual_dir={gtav}", f"--data_dir={data_dir}", "--num_workers=1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = run_cli([sys.executable, "-c", KILL_MID_CONVERSION, *args], env=env)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert len(list((data_dir / "dg_prepare_cache").rglob("chunk*.npz"))) == 2
    assert not list(data_dir.rglob("incomplete.*"))
    # A writer killed after the conversion leaves an `incomplete.*` folder: the next run clears it.
    (data_dir / "dg_gtav" / "incomplete.ABC123_1.0.0").mkdir(parents=True)
    builder = _prepare(gtav, tmp_path)
    assert builder.info.splits["train"].num_examples == 6
    assert not list(data_dir.rglob("incomplete.*"))
