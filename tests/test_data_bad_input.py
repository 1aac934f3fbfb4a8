"""Bad input gets a clear error naming the file (or, when asked, a logged count of skips);
an interrupted prepare leaves no loadable half dataset and resumes without redoing chunks."""

import dataclasses
import json
import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from recyclelora_jax.data import codecs, convert, labels, synthetic
from recyclelora_jax.data.builders import unknown_labels
from recyclelora_jax.data.prepare import main, prepare


@pytest.fixture
def gtav(tmp_path):
    return synthetic.write_gtav(tmp_path / "gtav", 6, size=(32, 16))


def _prepare(root, tmp_path, **kw):
    return prepare("dg_gtav", root, tmp_path / "tfds", num_workers=1, **kw)


def test_corrupt_image_is_named(gtav, tmp_path):
    (gtav / "images" / "00003.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"00003\.png: not a decodable image"):
        _prepare(gtav, tmp_path)


def test_size_mismatch_is_named(gtav, tmp_path):
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(gtav / "labels" / "00002.png")
    with pytest.raises(ValueError, match=r"labels/00002\.png: label size \(10, 10\) differs"):
        _prepare(gtav, tmp_path)


def test_image_without_label_is_named(gtav, tmp_path):
    (gtav / "labels" / "00004.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"images/00004\.png: no label file"):
        _prepare(gtav, tmp_path)


def _plant_unknown_values(gtav) -> dict[str, np.ndarray]:
    """Values outside the GTAV table (34..255) in two of the six labels; all raw labels."""
    raws = {p.name: np.asarray(Image.open(p)) for p in sorted((gtav / "labels").glob("*.png"))}
    raws["00001.png"] = raws["00001.png"].copy()
    raws["00001.png"][:3, :5], raws["00001.png"][10:, 30:] = 40, 200
    raws["00004.png"] = raws["00004.png"].copy()
    raws["00004.png"][5:7] = 40
    for name in ("00001.png", "00004.png"):
        Image.fromarray(raws[name]).save(gtav / "labels" / name)
    return raws


def test_values_outside_the_table_become_ignore_counted_and_recorded(gtav, tmp_path, capsys):
    """The reference's mapping by default: each value outside the table is ignore (255), the
    stored labels equal the reference converter's rule written out here, and the pixels per
    value and file are summarised at the end and kept in the dataset's metadata."""
    raws = _plant_unknown_values(gtav)
    main(["dg_gtav", f"--manual_dir={gtav}", f"--data_dir={tmp_path / 'tfds'}", "--num_workers=1"])
    source = tfds.data_source("dg_gtav", split="train", data_dir=str(tmp_path / "tfds"))
    assert len(source) == 6
    for example in source:
        raw = raws[example["file_name"].decode()]
        want = np.full(raw.shape, 255, np.uint8)  # DAFormer's gta.py: 255, then each table id
        for raw_id, train_id in labels.CITYSCAPES_ID_TO_TRAIN.items():
            want[raw == raw_id] = train_id
        np.testing.assert_array_equal(codecs.decode_label(example["label"]), want)
    assert capsys.readouterr().out.splitlines()[-1] == (
        "  label values outside the GTAV table, mapped to ignore (255), in 2 files: "
        "40 (79 pixels in 2 files), 200 (12 pixels in 1 file)"
    )
    report = unknown_labels(tfds.builder("dg_gtav", data_dir=str(tmp_path / "tfds")))
    assert report["train"].files == {"00001.png": {40: 15, 200: 12}, "00004.png": {40: 64}}
    assert report["train"].values() == {
        40: {"pixels": 79, "files": 2},
        200: {"pixels": 12, "files": 1},
    }
    (tmp_path / "tfds" / "dg_gtav" / "1.0.0" / "metadata.json").unlink()  # an older dataset
    assert unknown_labels(tfds.builder("dg_gtav", data_dir=str(tmp_path / "tfds"))) == {}


def test_strict_labels_name_the_file_and_its_values(gtav, tmp_path, caplog):
    """`--strict_labels` stops at the file (values and pixel counts named); with
    `--skip_invalid` it drops such images as `--skip_invalid` alone did before the mapping
    became the default; `--skip_invalid` alone now keeps them (values mapped to ignore)."""
    _plant_unknown_values(gtav)
    with pytest.raises(
        ValueError,
        match=r"00001\.png: label values \[40, 200\] are not in the GTAV label table "
        r"\(pixels: \[15, 12\]\) \(use --skip_invalid",
    ):
        main(["dg_gtav", f"--manual_dir={gtav}", f"--data_dir={tmp_path / 'a'}", "--strict_labels"])
    with caplog.at_level(logging.WARNING):
        strict = prepare("dg_gtav", gtav, tmp_path / "b", skip_invalid=True, strict_labels=True)
    assert strict.info.splits["train"].num_examples == 4
    assert "Skipped 2 invalid files of 6" in caplog.text
    assert unknown_labels(strict)["train"].files == {}
    default = prepare("dg_gtav", gtav, tmp_path / "c", skip_invalid=True)
    assert default.info.splits["train"].num_examples == 6
    assert set(unknown_labels(default)["train"].files) == {"00001.png", "00004.png"}


def test_cache_chunks_from_before_the_count(gtav, tmp_path, monkeypatch, caplog):
    """Chunks written before unknown values were counted (no `unknown` entry) are read when
    they skipped nothing (such values then stopped the prepare, so there were none); one that
    skipped files may have skipped them for such values and is converted again, saying so."""
    monkeypatch.setattr(convert, "CHUNK_SIZE", 3)
    builder = tfds.builder("dg_gtav", data_dir=str(tmp_path / "tfds"))
    pairs, task, cache_dir = builder._conversion(gtav, "train")
    for chunk, path in convert.fill_cache(pairs, task, cache_dir):
        with np.load(path) as z:
            arrays = dict(z)
        info = json.loads(arrays["json"].tobytes())
        del info["unknown"]
        info["skipped"] = ["labels/00009.png: ..."] if chunk[0].name == "00004.png" else []
        arrays["json"] = np.frombuffer(json.dumps(info).encode(), np.uint8)
        np.savez(path, **arrays)
    calls = []
    original = convert.convert_pair
    monkeypatch.setattr(
        convert, "convert_pair", lambda p, t: calls.append(p.name) or original(p, t)
    )
    with caplog.at_level(logging.WARNING):
        examples = list(convert.convert_all(pairs, task, cache_dir))
    assert len(examples) == 6 and calls == ["00004.png", "00005.png", "00006.png"]
    assert caplog.text.count("predates the counting of unknown label values") == 1
    strict = dataclasses.replace(task, strict_labels=True)  # its chunks keep what it skipped
    assert convert._chunk_key(pairs[:3], strict) != convert._chunk_key(pairs[:3], task)


def test_empty_folder_and_wrong_layout(tmp_path):
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "labels").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no '\*\.png' images found under .*empty/images"):
        _prepare(tmp_path / "empty", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"wrong layout: expected the image folder at"):
        prepare("dg_cityscapes", tmp_path / "empty", tmp_path / "tfds", num_workers=1)
    with pytest.raises(AssertionError, match=r"Manual directory .*missing does not exist"):
        _prepare(tmp_path / "missing", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset 'gtav'"):
        prepare("gtav", tmp_path, tmp_path)


def test_skip_invalid_logs_a_count(gtav, tmp_path, caplog):
    (gtav / "images" / "00003.png").write_bytes(b"broken")
    (gtav / "labels" / "00005.png").unlink()
    with caplog.at_level(logging.WARNING):
        builder = _prepare(gtav, tmp_path, skip_invalid=True)
    assert builder.info.splits["train"].num_examples == 4
    assert "Skipped 1 invalid files of 5" in caplog.text
    assert "Skipped 1 images without a label" in caplog.text


def test_interrupted_prepare_resumes_and_is_atomic(gtav, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(convert, "CHUNK_SIZE", 2)
    good = (gtav / "images" / "00005.png").read_bytes()
    (gtav / "images" / "00005.png").write_bytes(b"broken")  # third chunk fails
    with pytest.raises(ValueError, match="00005"):
        _prepare(gtav, tmp_path)
    assert not (tmp_path / "tfds" / "dg_gtav" / "1.0.0").exists()  # nothing half-written loads
    assert not tfds.builder("dg_gtav", data_dir=str(tmp_path / "tfds")).is_prepared()
    (gtav / "images" / "00005.png").write_bytes(good)
    calls = []
    original = convert.convert_pair
    monkeypatch.setattr(
        convert, "convert_pair", lambda p, t: calls.append(p.name) or original(p, t)
    )
    main(["dg_gtav", f"--manual_dir={gtav}", f"--data_dir={tmp_path / 'tfds'}", "--num_workers=1"])
    assert sorted(calls) == ["00005.png", "00006.png"]  # chunks 1-2 came from the cache
    assert "train: 6 examples" in capsys.readouterr().out
    assert len(tfds.data_source("dg_gtav", split="train", data_dir=str(tmp_path / "tfds"))) == 6
    assert not (tmp_path / "tfds" / "dg_prepare_cache" / "dg_gtav__1.0.0").exists()
    calls.clear()
    _prepare(gtav, tmp_path)  # complete: nothing is redone
    assert calls == []
