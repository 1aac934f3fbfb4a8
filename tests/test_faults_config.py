"""Bad configuration is found before any work, one line per bad value."""

from __future__ import annotations

import ml_collections

from recyclelora_jax.evaluate.suite import check_eval


def _eval_cfg(datasets, **eval_values) -> ml_collections.ConfigDict:
    e = dict(mode="whole", crop_size=64, stride=43, split="validation", datasets=datasets)
    return ml_collections.ConfigDict({"data": {"data_dir": "unused"}, "eval": e | eval_values})


def test_every_bad_evaluation_set_gets_its_line_and_nothing_is_created(data, tmp_path):
    photo = str(data["cityscapes_photo"][1])
    cfg = _eval_cfg(
        (
            ("good", "dg_cityscapes", "validation", photo, "native"),
            ("sliced", "dg_cityscapes", "validation[1:]", photo, "native"),
            ("missing", "dg_cityscapes", "validation", str(tmp_path / "nothere"), ""),
            ("split", "dg_cityscapes", "test", photo, ""),
            ("slice", "dg_cityscapes", "validation[9:]", photo, ""),
            ("builder", "dg_nope", "validation", photo, ""),
            ("profile", "dg_cityscapes", "validation", photo, "nativ"),
        ),
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
    good = _eval_cfg((("good", "dg_cityscapes", "validation", photo, "native"),))
    assert check_eval(good) == []
