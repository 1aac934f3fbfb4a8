"""grain training loader: determinism (runs, workers), exact resume, shards, source mixing."""

import json

import numpy as np
import pytest

from recyclelora_jax.data import pipeline

GTAV, PHOTO = 20, 16  # train records of the shared test datasets (conftest ``data``)


@pytest.fixture(scope="module")
def datasets(data):
    gtav, cs = data["gtav"], data["cityscapes_photo"]
    return [(gtav[0], "train", str(gtav[1])), (cs[0], "train", str(cs[1]))]


def _loader(sources, **kw):
    args = {"batch_size": 2, "crop_size": (32, 32), "seed": 3, "shard_index": 0, "shard_count": 1}
    return pipeline.make_train_loader(sources, **{**args, **kw})


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_batches_have_the_contract_shapes(datasets):
    batch = next(iter(_loader(datasets)))
    assert batch["image"].shape == (2, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (2, 32, 32) and batch["label"].dtype == np.int32


def test_bit_deterministic_across_runs_and_worker_counts(datasets):
    ref = _take(iter(_loader(datasets)), 4)
    _assert_same(ref, _take(iter(_loader(datasets)), 4))
    _assert_same(ref, _take(iter(_loader(datasets, num_workers=1)), 4))
    _assert_same(ref, _take(iter(_loader(datasets, num_workers=2)), 4))
    assert not np.array_equal(
        ref[0]["image"], _take(iter(_loader(datasets, seed=4)), 1)[0]["image"]
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_state_restore_continues_exactly(datasets, workers):
    expected = _take(iter(_loader(datasets)), 5)
    first = iter(_loader(datasets, num_workers=workers))
    _take(first, 3)
    state = first.get_state()
    assert json.loads(state)["worker_count"] == workers  # JSON, storable by orbax
    resumed = iter(_loader(datasets, num_workers=workers))
    resumed.set_state(state)
    _assert_same(expected[3:], _take(resumed, 2))


def test_two_processes_get_disjoint_covering_shards(datasets):
    source = pipeline.MixedSource([pipeline.Source(*s) for s in datasets], seed=3)
    n = len(source)
    assert n == GTAV + PHOTO
    seen = []
    for shard in (0, 1):
        sampler = pipeline.make_sampler(n, 3, shard, 2, local_batch=1)
        keys = [sampler[k * 2 + shard].record_key for k in range(n // 2)]  # grain's indexing
        seen.append({tuple(source.records[i]) for i in keys})
        assert len(seen[-1]) == n // 2
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {tuple(r) for r in source.records}
    assert {k for k, _ in seen[0]} == {0, 1}  # every shard mixes both sources


@pytest.mark.parametrize("local_batch", [1, 3])
def test_global_batches_do_not_depend_on_the_process_count(local_batch):
    """Process p's k-th local batch is the p-th slice of global batch k, for any count."""
    single = pipeline.make_sampler(24, 3, 0, 1, local_batch=2 * local_batch)
    split = [pipeline.make_sampler(24, 3, p, 2, local_batch=local_batch) for p in (0, 1)]
    for batch in range(5):  # crosses epoch boundaries
        whole = [single[batch * 2 * local_batch + j] for j in range(2 * local_batch)]
        parts = [
            split[p][(batch * local_batch + j) * 2 + p] for p in (0, 1) for j in range(local_batch)
        ]
        assert [m.record_key for m in parts] == [m.record_key for m in whole]
        assert [m.index for m in parts] == [m.index for m in whole]  # same per-record rng


def test_epochs_are_reshuffled(datasets):
    sampler = pipeline.make_sampler(24, 3, 0, 1)
    epochs = [[sampler[e * 24 + i].record_key for i in range(24)] for e in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(24))
    assert epochs[0] != epochs[1]


def test_subsets_are_drawn_from_the_seed(datasets):
    gtav, cs = datasets

    def picked(seed):
        src = pipeline.MixedSource([pipeline.Source(*gtav, subset=5), pipeline.Source(*cs)], seed)
        return sorted(map(tuple, src.records))

    a, b = picked(0), picked(1)
    assert a == picked(0) and a != b
    assert sum(k == 0 for k, _ in a) == 5 and sum(k == 1 for k, _ in a) == PHOTO
    assert len(pipeline.MixedSource([pipeline.Source(*gtav)], 0)) == GTAV  # no subset: all


def test_resume_with_another_worker_count_is_refused(datasets):
    """grain's state names its worker count; restoring it into another count raises."""
    state = iter(_loader(datasets)).get_state()
    other = iter(_loader(datasets, num_workers=1))
    with pytest.raises(ValueError, match="worker"):
        other.set_state(state)


@pytest.mark.parametrize("crop", [32, 384, 768])
def test_train_resize_scales_follow_the_crop(crop):
    """mmseg's ratio range 0.5-2.0 in steps of 0.1 of the crop, longer side ≤ 4 × crop (512:
    256 ... 1024 and 2048): computed here in integer arithmetic."""
    augment = pipeline.TrainAugment((crop, crop))
    assert augment.scales == tuple(crop * k // 10 for k in range(5, 21))
    assert augment.max_size == 4 * crop


def test_train_augment_applies_the_crop_scaled_sizes(monkeypatch):
    """A 40-pixel crop: every resize lands on a shorter side of 20 ... 80 and a longer side of
    at most 160, and the batch has the crop's shape."""
    sizes = []
    resize = pipeline.transforms.resize
    monkeypatch.setattr(
        pipeline.transforms, "resize", lambda im, lab, s: sizes.append(s) or resize(im, lab, s)
    )
    image = np.zeros((30, 90, 3), np.uint8)  # 1:3, so the 160 cap binds above a short side 53
    label = np.tile(np.arange(90, dtype=np.uint8) // 10, (30, 1))
    augment = pipeline.TrainAugment((40, 40))
    for seed in range(48):
        image_out, _ = pipeline.transforms.train_augment(
            image, label, np.random.default_rng(seed), (40, 40), augment.scales, augment.max_size
        )
        assert image_out.shape == (40, 40, 3)
    assert all(max(s) <= 160 for s in sizes)
    shorts = {min(s) for s in sizes if max(s) < 160}
    assert shorts <= {40 * k // 10 for k in range(5, 21)} and len(shorts) >= 3
    assert any(max(s) == 160 for s in sizes)


def test_too_small_for_a_batch(datasets):
    with pytest.raises(ValueError, match="cannot fill batches of 16 on 2 shards"):
        _loader(datasets[:1], batch_size=16, shard_count=2)
