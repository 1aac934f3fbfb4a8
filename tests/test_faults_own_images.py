"""`eval.py --images` on awkward photos: 16-bit depth converted (not clipped to white), a big
photo resized to the test scale with windows per call bounded by memory, bad files named."""

from __future__ import annotations

import cv2
import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image
from train_helpers import tiny_segmentor

from recyclelora_jax.data.transforms import keep_ratio_size
from recyclelora_jax.evaluate import own_images


@pytest.fixture(scope="module")
def model_and_params():
    model = tiny_segmentor("linear")
    params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))["params"]
    return model, params


def _cfg(mode: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"eval": {"mode": mode, "crop_size": 32, "stride": 16}})


@pytest.fixture
def spy(monkeypatch):
    """Records the image shape and windows per call of every `predict_logits` call."""
    calls = []
    original = own_images.predict_logits

    def recording(predict, images, mode, crop, stride, per_call):
        calls.append((images.shape[1:3], per_call))
        return original(predict, images, mode, crop, stride, per_call)

    monkeypatch.setattr(own_images, "predict_logits", recording)
    return calls


def test_sixteen_bit_photo_is_scaled_not_clipped(model_and_params, tmp_path, spy):
    grey = np.random.default_rng(0).integers(0, 2**16, (40, 48), dtype=np.uint16)
    (tmp_path / "in").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "deep.png"), grey)
    own_images.segment_folder(  # native size: the test scale would run a 1024 x 1229 image
        *model_and_params, _cfg("whole"), tmp_path / "in", tmp_path / "out", scale=None
    )
    shown = np.asarray(Image.open(tmp_path / "out" / "deep.png"))[:, :48]  # image | prediction
    np.testing.assert_array_equal(shown, np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, 2))


@pytest.mark.parametrize("scale", [(64, 48), None], ids=["test_scale", "native"])
def test_big_photo_is_resized_and_windows_are_bounded(model_and_params, tmp_path, spy, scale):
    photo = np.random.default_rng(1).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    (tmp_path / "in").mkdir()
    Image.fromarray(photo).save(tmp_path / "in" / "big.jpg")
    model = model_and_params[0]
    budget = 3 * own_images.window_bytes(model, (32, 32))
    own_images.segment_folder(
        *model_and_params,
        _cfg("slide"),
        tmp_path / "in",
        tmp_path / "out",
        scale=scale,
        memory_budget=budget,
    )
    want = (90, 120) if scale is None else keep_ratio_size(90, 120, scale)
    assert spy == [(want, 3)]
    ids = np.asarray(Image.open(tmp_path / "out" / "big_ids.png"))
    assert ids.shape == (90, 120)  # back at the photo's size
    assert ids.max() < 19


def test_window_bound_grows_with_the_budget(model_and_params):
    model = model_and_params[0]
    one = own_images.window_bytes(model, (32, 32))
    assert own_images.windows_per_call(model, 32, budget=one - 1) == 1
    assert own_images.windows_per_call(model, 32, budget=10 * one) == 10


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "empty file"), (b"\xff\xd8\xff\xe0 cut short", "not a decodable image")],
)
def test_unreadable_photo_is_named(model_and_params, tmp_path, content, message):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bad.jpg").write_bytes(content)
    with pytest.raises(ValueError, match=rf"in/bad\.jpg: {message}"):
        own_images.segment_folder(
            *model_and_params, _cfg("whole"), tmp_path / "in", tmp_path / "out"
        )
