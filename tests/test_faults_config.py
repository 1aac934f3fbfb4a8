"""Bad configuration is found before any work, one line per bad value."""

from __future__ import annotations

import ml_collections
import pytest

from recyclelora_jax.config import EVAL_DEFAULTS, data_sources
from recyclelora_jax.evaluate.suite import check_eval, eval_sets


def _eval_cfg(datasets, **eval_values) -> ml_collections.ConfigDict:
    e = dict(mode="whole", crop_size=64, stride=43, split="validation", datasets=datasets)
    return ml_collections.ConfigDict({"data": {"data_dir": "unused"}, "eval": e | eval_values})


def test_every_bad_evaluation_set_gets_its_line_and_nothing_is_created(data, tmp_path):
    photo = str(data["cityscapes_photo"][1])
    sets = (
        ("good", "dg_cityscapes", "validation", photo, "native"),
        ("sliced", "dg_cityscapes", "validation[1:]", photo, "native"),
        ("missing", "dg_cityscapes", "validation", str(tmp_path / "nothere"), ""),
        ("split", "dg_cityscapes", "test", photo, ""),
        ("slice", "dg_cityscapes", "validation[9:]", photo, ""),
        ("builder", "dg_nope", "validation", photo, ""),
        ("profile", "dg_cityscapes", "validation", photo, "nativ"),
    )
    cfg = _eval_cfg(
        tuple(dict(zip(EVAL_DEFAULTS, s, strict=True)) for s in sets),
        mode="slid",
        stride=0,
    )
    problems = check_eval(cfg)
    assert problems[:2] == [
        "eval.mode='slid': choose one of slide, whole",
        "eval.stride=0: must be a positive int",
    ]
    named = [p.split("'")[1] for p in problems[2:]]
    assert named == ["missing", "split", "slice", "builder", "profile"]
    assert f"in {tmp_path / 'nothere'}): not prepared there" in problems[2]
    assert "Unknown split 'test'" in problems[3]
    assert "Dataset dg_nope not found" in problems[5]
    assert "unknown evaluation profile 'nativ'" in problems[6]
    assert not (tmp_path / "nothere").exists()
    assert check_eval(_eval_cfg(cfg.eval.datasets[:1])) == []  # the good set alone


def test_positional_entries_of_earlier_configs_load_with_a_warning_naming_the_key():
    """Configs (and checkpoints) from before named fields: the same sets and sources, with a
    FutureWarning that names the key and spells out the new form; a misspelt field is an
    error naming the entry."""
    named = _eval_cfg(
        (
            dict(name="photo", builder="dg_cityscapes", data_dir="d", profile="native"),
            dict(builder="dg_bdd100k"),
        )
    )
    old = _eval_cfg([["photo", "dg_cityscapes", "", "d", "native"], "dg_bdd100k"])  # as JSON
    with pytest.warns(FutureWarning, match=r"eval\.datasets\[0, 1\] as positional tuples"):
        assert eval_sets(old) == eval_sets(named)
    assert [s.name for s in eval_sets(named)] == ["photo", "bdd100k"]
    sources = lambda value: ml_collections.ConfigDict({"data": {"sources": value}})
    want = [dict(builder="dg_gtav", split="train", subset=12_403, data_dir="")]
    assert data_sources(sources((dict(builder="dg_gtav", subset=12_403),))) == want
    with pytest.warns(FutureWarning, match=r"write data\.sources = \(\{'builder': 'dg_gtav'"):
        assert data_sources(sources([["dg_gtav", "train", 12_403]])) == want
    with pytest.raises(ValueError, match=r"data\.sources\[0\]: unknown fields \['subst'\]"):
        data_sources(sources((dict(builder="dg_gtav", subst=1),)))
