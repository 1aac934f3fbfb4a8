"""Evaluation input: mmcv keep-ratio sizes, per-dataset profiles, equal-shape batches,
labels at the stored resolution."""

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds

from recyclelora_jax.data import codecs, evaluation, transforms


@pytest.mark.parametrize(
    ("hw", "scale", "want"),
    [((1024, 2048), (2048, 1024), (1024, 2048)),  # Cityscapes: unchanged
     ((720, 1280), (1280, 720), (720, 1280)),  # BDD100K: unchanged
     ((1512, 2016), (2048, 1024), (1024, 1365)),  # Mapillary 4032x3024 after halving
     ((1080, 1920), (2048, 1024), (1024, 1820)),  # ACDC
     ((600, 800), (1280, 720), (720, 960)),
     ((1000, 1999), (2048, 1024), (1024, 2047)),  # 2046.976: rounds up, not truncated
     ((7, 9), (2048, 1024), (1024, 1317)),  # 1316.57
     ((1600, 900), (1280, 720), (1280, 720)),  # portrait: the long side fits 1280
     ((1601, 900), (1280, 720), (1280, 720)),  # 719.55 rounds up to 720
     ((900, 1601), (1280, 720), (720, 1280))],  # 719.55 rounds up
)  # fmt: skip
def test_keep_ratio_size_matches_mmcv_rescale_size(hw, scale, want):
    assert transforms.keep_ratio_size(*hw, scale) == want


def test_default_profiles():
    assert evaluation.profile_for("dg_cityscapes").scale == (2048, 1024)
    assert evaluation.profile_for("dg_bdd100k").scale == (1280, 720)
    assert evaluation.profile_for("dg_mapillary").halve
    assert not evaluation.profile_for("dg_mapillary/half").halve
    assert evaluation.profile_for("dg_gtav").scale is None
    with pytest.raises(ValueError, match="unknown evaluation profile 'nope'"):
        evaluation.profile_for("dg_cityscapes", "nope")


@pytest.fixture(scope="module")
def val_data(data):
    """conftest's Cityscapes-layout "photo" set: 4 validation images of 96x48."""
    return data["cityscapes_photo"]


def test_eval_batches_resize_images_and_keep_labels(val_data):
    builder, data_dir = val_data
    profile = evaluation.EvalProfile((100, 60))
    batches = list(evaluation.eval_batches(builder, "validation", str(data_dir),
                                           dataset_profile=profile, batch_size=3))  # fmt: skip
    assert [len(b["file_name"]) for b in batches] == [3, 1]  # the last batch is short
    stored = {
        ex["file_name"].decode(): ex
        for ex in tfds.data_source(builder, split="validation", data_dir=str(data_dir))
    }
    for batch in batches:
        assert batch["image"].shape[1:] == (50, 100, 3) and batch["label"].shape[1:] == (48, 96)
        for image, label, name in zip(
            batch["image"], batch["label"], batch["file_name"], strict=True
        ):
            raw = codecs.decode_image(stored[name]["image"])
            want = transforms.normalize(cv2.resize(raw, (100, 50), interpolation=cv2.INTER_LINEAR))
            np.testing.assert_array_equal(image, want)
            np.testing.assert_array_equal(label, codecs.decode_label(stored[name]["label"]))


def test_eval_shards_are_disjoint_and_cover(val_data):
    builder, data_dir = val_data
    names = [
        sorted(n for b in evaluation.eval_batches(builder, "validation", str(data_dir),
                                                  shard_index=i, shard_count=2)
               for n in b["file_name"])
        for i in (0, 1)
    ]  # fmt: skip
    assert not set(names[0]) & set(names[1]) and len(names[0]) + len(names[1]) == 4


def test_mapillary_halving_is_the_official_tool():
    """The official ``mapillary_resize``: PIL antialiased bicubic to (W // 2, H // 2) saved as
    JPEG quality 75, labels PIL nearest (pixels 2i + 1); odd sizes round down."""
    import io

    import cv2
    from PIL import Image

    from recyclelora_jax.data.convert import halve

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (31, 41, 3), dtype=np.uint8)
    label = rng.integers(0, 19, (31, 41), dtype=np.uint8)
    got_image, got_label = halve(image, label)
    small = Image.fromarray(image).resize((20, 15), Image.Resampling.BICUBIC)
    jpeg = io.BytesIO()
    small.save(jpeg, format="JPEG", quality=75)
    want = cv2.imdecode(np.frombuffer(jpeg.getvalue(), np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(got_image, cv2.cvtColor(want, cv2.COLOR_BGR2RGB))
    np.testing.assert_array_equal(got_label, label[1::2, 1::2][:15, :20])
    np.testing.assert_array_equal(
        got_label, np.asarray(Image.fromarray(label).resize((20, 15), Image.Resampling.NEAREST))
    )
    old_image, old_label = halve(image, label, mode="opencv")  # the earlier rule stays available
    assert old_image.shape == (16, 21, 3) and old_label.shape == (16, 21)  # sizes rounded
