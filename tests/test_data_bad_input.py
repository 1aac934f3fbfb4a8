"""Bad input gets a clear error naming the file (or, when asked, a logged count of skips);
an interrupted prepare leaves no loadable half dataset and resumes without redoing chunks."""

import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from recyclelora_jax.data import convert, synthetic
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


def test_values_outside_the_table_are_named(gtav, tmp_path):
    Image.fromarray(np.full((16, 32), 40, np.uint8)).save(gtav / "labels" / "00001.png")
    with pytest.raises(ValueError, match=r"00001\.png: label values \[40\] are not in the GTAV"):
        _prepare(gtav, tmp_path)


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
