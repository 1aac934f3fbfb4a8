"""Sliding-window inference against a plain re-implementation of mmseg 1.x's `slide_inference`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec

from recyclelora_jax.evaluate.inference import (
    logits_to_labels,
    predict_logits,
    slide_inference,
    slide_windows,
    whole_inference,
    window_counts,
)

K = 5
RNG = np.random.default_rng(0)
WEIGHTS = RNG.normal(size=(3, K)).astype(np.float32)


def mmseg_slide(inputs, predict, crop, stride):
    """mmseg's loop, NHWC: returns averaged logits, the windows in visiting order, count map."""
    h_stride, w_stride = stride
    h_crop, w_crop = crop
    batch_size, h_img, w_img, _ = inputs.shape
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = np.zeros((batch_size, h_img, w_img, K))
    count_mat = np.zeros((batch_size, h_img, w_img, 1))
    windows = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1 = h_idx * h_stride
            x1 = w_idx * w_stride
            y2 = min(y1 + h_crop, h_img)
            x2 = min(x1 + w_crop, w_img)
            y1 = max(y2 - h_crop, 0)
            x1 = max(x2 - w_crop, 0)
            crop_img = inputs[:, y1:y2, x1:x2, :]
            crop_seg_logit = predict(crop_img)
            padded = np.pad(crop_seg_logit, ((0, 0), (y1, h_img - y2), (x1, w_img - x2), (0, 0)))
            preds += padded
            count_mat[:, y1:y2, x1:x2] += 1
            windows.append((y1, y2, x1, x2))
    assert (count_mat == 0).sum() == 0
    return preds / count_mat, windows, count_mat[0, :, :, 0]


def context_predict(x):
    """Depends on the whole crop (its mean), so overlapping windows disagree: tests the average."""
    return jnp.tanh(x @ WEIGHTS) + x.mean(axis=(1, 2), keepdims=True) @ WEIGHTS


# (height, width): smaller than the crop, equal to it, not a multiple of the stride, mixed.
SHAPES = [(40, 56), (64, 64), (150, 200), (64, 150), (30, 131)]


@pytest.mark.parametrize("shape", [*SHAPES, (1024, 2048), (720, 1280), (500, 333)])
def test_window_grid_and_counts_match_mmseg(shape):
    crop, stride = ((512, 512), (341, 341)) if max(shape) > 300 else ((64, 64), (43, 43))
    zeros = lambda x: np.zeros((*x.shape[:3], K))
    _, ref_windows, ref_counts = mmseg_slide(np.zeros((1, *shape, 3)), zeros, crop, stride)
    windows = slide_windows(*shape, crop, stride)
    assert [tuple(w) for w in windows] == ref_windows
    counts = window_counts(*shape, windows)
    np.testing.assert_array_equal(counts, ref_counts)
    assert counts.min() >= 1


@pytest.mark.parametrize("shape", SHAPES)
def test_slide_inference_matches_mmseg_loop(shape):
    images = RNG.normal(size=(2, *shape, 3)).astype(np.float32)
    expected, _, _ = mmseg_slide(
        images, lambda x: np.asarray(context_predict(x)), (64, 64), (43, 43)
    )
    ours = slide_inference(context_predict, jnp.asarray(images), crop=64, stride=43)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-5)


def test_pixelwise_model_slide_equals_whole_and_compiles_once():
    """A per-pixel function of the input (here of the pixel position encoded in the image) gives
    the same logits however the image is tiled; padded last calls keep one compiled shape."""
    yy, xx = np.meshgrid(np.arange(150), np.arange(200), indexing="ij")
    image = np.stack([yy / 150, xx / 200, np.sin(yy * xx / 500)], -1)[None].astype(np.float32)
    predict = jax.jit(lambda x: jnp.sin(3 * x @ WEIGHTS))
    whole = whole_inference(predict, jnp.asarray(image))
    for per_call in (None, 1, 4):  # 12 windows: one call, 12 calls, 3 calls
        predict = jax.jit(lambda x: jnp.sin(3 * x @ WEIGHTS))
        slide = predict_logits(predict, jnp.asarray(image), "slide", 64, 43, per_call)
        np.testing.assert_allclose(np.asarray(slide), np.asarray(whole), rtol=1e-6, atol=1e-6)
        assert predict._cache_size() == 1


def test_slide_inference_on_sharded_batch(mesh8):
    images = RNG.normal(size=(8, 70, 90, 3)).astype(np.float32)
    mesh = mesh8
    sharded = jax.device_put(images, NamedSharding(mesh, PartitionSpec("data")))
    ours = slide_inference(context_predict, sharded, crop=64, stride=43, windows_per_call=2)
    assert ours.sharding.spec == PartitionSpec("data")  # windows are cut and summed per device
    expected, _, _ = mmseg_slide(
        images, lambda x: np.asarray(context_predict(x)), (64, 64), (43, 43)
    )
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-5)


def test_logits_to_labels_matches_torch_interpolate():
    logits = RNG.normal(size=(2, 13, 17, K)).astype(np.float32)
    ours = logits_to_labels(jnp.asarray(logits), (40, 51))
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(logits).permute(0, 3, 1, 2),
        size=(40, 51),
        mode="bilinear",
        align_corners=False,
    )
    np.testing.assert_array_equal(np.asarray(ours), resized.argmax(1).numpy())


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="images must be"):
        slide_inference(context_predict, jnp.zeros((32, 32, 3)))
    with pytest.raises(ValueError, match="predict_fn returned"):
        slide_inference(lambda x: x[:, ::2], jnp.zeros((1, 32, 32, 3)), crop=16, stride=8)
    with pytest.raises(ValueError, match="mode must be"):
        predict_logits(context_predict, jnp.zeros((1, 8, 8, 3)), mode="tiled")
    with pytest.raises(ValueError, match="windows_per_call must be"):
        slide_inference(context_predict, jnp.zeros((1, 32, 32, 3)), windows_per_call=0)
    with pytest.raises(ValueError, match="stride must be"):
        slide_windows(64, 64, 32, 0)
