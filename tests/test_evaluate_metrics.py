"""Confusion matrix and mIoU against cityscapesscripts' own evaluation (label ids, PNG files)."""

import json
import math
import types

import jax
import numpy as np
import pytest
from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs_eval
from cityscapesscripts.helpers.labels import trainId2label
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from recyclelora_jax.classes import CLASS_NAMES as CITYSCAPES_CLASSES
from recyclelora_jax.evaluate.metrics import (
    confusion_matrix,
    format_table,
    iou_per_class,
    mean_iou,
    summarize,
)

K = 19


def test_class_names_match_cityscapesscripts():
    assert tuple(trainId2label[t].name for t in range(K)) == CITYSCAPES_CLASSES


def _random_maps(seed: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Labels with ignore (255) and out-of-range ids (19..40), class 5 absent from labels and
    predictions (nan IoU), class 7 predicted but never labelled (IoU 0)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K, shape)
    preds = np.where(rng.random(shape) < 0.4, labels, rng.integers(0, K, shape))
    labels[labels == 7] = 0
    labels[rng.random(shape) < 0.1] = 255
    out_of_range = rng.random(shape) < 0.05
    labels[out_of_range] = rng.integers(K, 41, shape)[out_of_range]
    labels[labels == 5] = 255
    preds[preds == 5] = 6
    return labels.astype(np.int32), preds.astype(np.int32)


def _to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """Train ids -> Cityscapes label ids; anything else -> 0 ('unlabeled', ignored in eval)."""
    table = np.zeros(256, np.uint8)
    for t in range(K):
        table[t] = trainId2label[t].id
    return table[np.clip(train_ids, 0, 255)]


def test_confusion_and_miou_match_cityscapesscripts(tmp_path):
    labels, preds = _random_maps(0, (3, 37, 53))
    args = types.SimpleNamespace(evalInstLevelScore=False, evalPixelAccuracy=False)
    ref = cs_eval.generateMatrix(args)
    for i in range(len(labels)):
        gt_file, pred_file = tmp_path / f"gt{i}.png", tmp_path / f"pred{i}.png"
        Image.fromarray(_to_label_ids(labels[i])).save(gt_file)
        Image.fromarray(_to_label_ids(preds[i])).save(pred_file)
        cs_eval.evaluatePair(str(pred_file), str(gt_file), ref, None, {}, args)

    ours = np.zeros((K, K), np.int64)
    for i in range(len(labels)):  # accumulated over calls, as the driver does
        ours += np.asarray(confusion_matrix(labels[i], preds[i], K))
    ids = [trainId2label[t].id for t in range(K)]
    np.testing.assert_array_equal(ours, ref[np.ix_(ids, ids)].astype(np.int64))

    ref_iou = {
        lid: cs_eval.getIouScoreForLabel(lid, ref, args) for lid in args.evalLabels if lid >= 0
    }
    iou = iou_per_class(ours)
    np.testing.assert_allclose(iou, [ref_iou[i] for i in ids], rtol=1e-12, equal_nan=True)
    assert math.isnan(iou[5]) and iou[7] == 0.0
    assert mean_iou(ours) == round(cs_eval.getScoreAverage(ref_iou, args) * 100, 2)


def test_confusion_matrix_on_sharded_batch_matches_numpy(mesh8):
    labels, preds = _random_maps(1, (8, 16, 24))
    mesh = mesh8
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    args = (jax.device_put(labels, sharding), jax.device_put(preds, sharding))
    sharded = confusion_matrix(*args, num_classes=K)
    # Each device counts its own pixels; only the (K*K + 1) counts are all-reduced.
    hlo = confusion_matrix.lower(*args, num_classes=K).compile().as_text()
    assert "all-gather" not in hlo and "all-reduce" in hlo
    valid = labels < K
    expected = np.zeros((K, K), np.int64)
    np.add.at(expected, (labels[valid], preds[valid]), 1)
    np.testing.assert_array_equal(np.asarray(sharded), expected)


def test_summarize_json_and_table():
    # Two classes: IoU a = 3 / (3 + 1) = 0.75, b = 2 / (2 + 1) = 0.6667; second set lacks b.
    confusions = {"setA": np.array([[3, 1], [0, 2]]), "setB": np.array([[5, 0], [0, 0]])}
    results = summarize(confusions, class_names=("a", "b"))
    assert results == {
        "miou": {"setA": 70.83, "setB": 100.0},
        "iou": {"setA": {"a": 75.0, "b": 66.67}, "setB": {"a": 100.0, "b": None}},
        "mean_miou": 85.42,
    }
    json.dumps(results, allow_nan=False)
    table = format_table(results).splitlines()
    assert table[0].split() == ["class", "setA", "setB"]
    assert table[2].split() == ["a", "75.00", "100.00"]
    assert table[3].split() == ["b", "66.67", "-"]
    assert table[5].split() == ["mIoU", "70.83", "100.00"]
    assert table[6].split() == ["mean", "mIoU", "85.42"]


def test_summarize_rejects_wrong_class_count():
    with pytest.raises(ValueError, match=r"'setA'.*3 classes"):
        summarize({"setA": np.eye(3)}, class_names=("a", "b"))
