"""`evaluate_dataset` end to end against a per-image reference: windows, torch resize, histogram."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec

from recyclelora_jax.evaluate.driver import evaluate_dataset
from recyclelora_jax.evaluate.inference import slide_windows

K = 4
RNG = np.random.default_rng(0)
WEIGHTS = RNG.normal(size=(3, K)).astype(np.float32)


def predict(x):
    return jnp.tanh(x @ WEIGHTS) + x.mean(axis=(1, 2), keepdims=True) @ WEIGHTS


def reference_prediction(image: np.ndarray, label_size: tuple[int, int], mode: str) -> np.ndarray:
    """One image, one window at a time, averaged, resized by torch, argmax."""
    total = np.zeros((*image.shape[:2], K))
    counts = np.zeros(image.shape[:2])
    windows = slide_windows(*image.shape[:2], 32, 21) if mode == "slide" else [(0, None, 0, None)]
    for y1, y2, x1, x2 in windows:
        total[y1:y2, x1:x2] += np.asarray(predict(image[None, y1:y2, x1:x2]))[0]
        counts[y1:y2, x1:x2] += 1
    logits = torch.from_numpy(total / counts[..., None]).permute(2, 0, 1)[None].float()
    resized = torch.nn.functional.interpolate(
        logits, size=label_size, mode="bilinear", align_corners=False
    )
    return resized[0].argmax(0).numpy()


def reference_confusion(batches, mode: str = "slide") -> tuple[np.ndarray, list[np.ndarray]]:
    total, preds = np.zeros((K, K), np.int64), []
    for batch in batches:
        for image, label in zip(batch["image"], batch["label"], strict=True):
            pred = reference_prediction(image, label.shape, mode)
            valid = label < K
            np.add.at(total, (label[valid], pred[valid]), 1)
            preds.append(pred)
    return total, preds


def make_batch(n: int, image_size, label_sizes) -> dict:
    labels = [RNG.integers(0, K + 1, size).astype(np.int32) for size in label_sizes]
    labels = [np.where(label == K, 255, label) for label in labels]
    return {
        "image": RNG.normal(size=(n, *image_size, 3)).astype(np.float32),
        "label": labels,
        "file_name": [f"img{i}.png" for i in range(n)],
    }


def test_matches_reference_with_list_and_array_labels():
    # Batch 1: per-image labels of different sizes (a list); batch 2: a (B, H, W) array.
    batches = [
        make_batch(2, (40, 50), [(57, 71), (80, 100)]),
        make_batch(2, (30, 30), [(45, 45)] * 2),
    ]
    batches[1]["label"] = np.stack(batches[1]["label"])
    expected, expected_preds = reference_confusion(batches)
    seen = []
    conf = evaluate_dataset(
        predict,
        batches,
        num_classes=K,
        crop=32,
        stride=21,
        progress=False,
        on_prediction=lambda batch, preds: seen.extend(preds),
    )
    np.testing.assert_array_equal(conf, expected)
    assert conf.dtype == np.int64 and conf.sum() > 0
    for ours, ref in zip(seen, expected_preds, strict=True):
        np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("mode", ["slide", "whole"])
def test_sharded_batch(mode, mesh8):
    batch = make_batch(8, (36, 44), [(50, 60)] * 8)
    expected, _ = reference_confusion([batch], mode)
    mesh = mesh8
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    sharded = {
        "image": jax.device_put(batch["image"], sharding),
        "label": jax.device_put(np.stack(batch["label"]), sharding),
    }
    conf = evaluate_dataset(
        predict, [sharded], num_classes=K, mode=mode, crop=32, stride=21, progress=False
    )
    np.testing.assert_array_equal(conf, expected)


def test_bad_batches_raise():
    batch = make_batch(2, (20, 20), [(20, 20)] * 2)
    with pytest.raises(KeyError, match="lacks \\['label'\\]"):
        evaluate_dataset(predict, [{"image": batch["image"]}], num_classes=K, progress=False)
    batch["label"] = batch["label"][:1]
    with pytest.raises(ValueError, match=r"img0\.png.*want 2"):
        evaluate_dataset(predict, [batch], num_classes=K, crop=16, stride=8, progress=False)
