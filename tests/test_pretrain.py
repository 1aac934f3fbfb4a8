"""The stand-in foundation model's objective: view alignment, the dense InfoNCE loss against a
direct numpy formula, photometric views, and a few steps of pretraining."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recyclelora_jax import pretrain
from recyclelora_jax.data.transforms import MEAN, STD, normalize
from recyclelora_jax.models.dinov2 import ARCHS, DinoV2


def test_aligned_patches_show_the_same_scene_position():
    grid, patch, size = 4, 8, 48  # views of 32 px cut from 48-px crops at 0..2 patch offsets
    scene = np.arange(size // patch)[:, None] * 10 + np.arange(size // patch)[None, :]
    offsets = np.array([[[0, 2], [1, 1]], [[2, 0], [1, 1]]])  # (view, batch, (row, col))
    views = [[scene[o[0] : o[0] + grid, o[1] : o[1] + grid].ravel() for o in v] for v in offsets]
    index, valid = pretrain._aligned(grid, jnp.asarray(offsets[0]), jnp.asarray(offsets[1]))
    for b in range(2):
        a_ids, b_ids = views[0][b], views[1][b]
        for i in range(grid * grid):
            if valid[b, i]:
                assert a_ids[i] == b_ids[index[b, i]]
            else:
                assert a_ids[i] not in b_ids
    assert valid[1].all() and valid[0].sum() == 2 * 2  # same offsets: all; (0,2)/(2,0): 2x2


def test_dense_contrastive_loss_matches_the_formula():
    rng = np.random.default_rng(0)
    za, zb = (rng.standard_normal((2, 5, 3)) for _ in range(2))
    index = rng.integers(0, 5, (2, 5))
    valid = rng.random((2, 5)) < 0.7
    got = pretrain.dense_contrastive_loss(
        jnp.asarray(za), jnp.asarray(zb), jnp.asarray(index), jnp.asarray(valid), 0.2
    )
    flat_b = zb.reshape(10, 3)
    terms = []
    for b in range(2):
        for i in range(5):
            if valid[b, i]:
                logits = flat_b @ za[b, i] / 0.2
                terms.append(np.log(np.exp(logits).sum()) - logits[b * 5 + index[b, i]])
    np.testing.assert_allclose(float(got), np.mean(terms), rtol=1e-5)


def test_native_crops_are_unscaled_windows_of_the_images():
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (3, 12, 20, 3), np.uint8)
    batches = pretrain.native_crops(images, 8, 6, seed=0)
    seen = set()
    for _ in range(3):
        batch = next(batches)
        assert batch.shape == (6, 8, 8, 3) and batch.dtype == np.float32
        for crop in batch:
            found = [
                (k, y, x, flip)
                for k in range(3)
                for y in range(5)
                for x in range(13)
                for flip in (False, True)
                if np.allclose(
                    crop, normalize(images[k, y : y + 8, x : x + 8][:, :: -1 if flip else 1])
                )
            ]
            assert found, "a crop is not a window of an image at its stored scale"
            seen.add(found[0][3])
    assert seen == {False, True}  # both flipped and unflipped crops occur


def test_photometric_views_keep_geometry_and_range():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (4, 16, 16, 3)).astype(np.float32)
    images = jnp.asarray((pixels - MEAN) / STD)
    view = np.asarray(pretrain.photometric_view(jax.random.key(0), images))
    rgb = view * STD + MEAN
    assert view.shape == images.shape
    assert rgb.min() >= -1e-3 and rgb.max() <= 255 + 1e-3  # clipped to valid pixels
    assert not np.allclose(view, images)  # re-rendered
    other = np.asarray(pretrain.photometric_view(jax.random.key(1), images))
    assert not np.allclose(view, other)  # two keys, two renderings


@pytest.mark.parametrize("every_block", [False, True])
def test_pretraining_lowers_the_loss_and_returns_a_backbone_tree(every_block):
    """With ``every_block`` the projection (and the loss) covers each block in ``out_indices``."""
    rng = np.random.default_rng(2)
    backbone = DinoV2(ARCHS["tiny"], out_indices=(1, 3) if every_block else (3,))
    # Smooth random images: a learnable signal (patch content) under photometric re-rendering.
    base = rng.standard_normal((8, 6, 6, 3)).astype(np.float32)
    images = np.asarray(jax.image.resize(base, (8, 48, 48, 3), "cubic"))

    def batches():
        while True:
            yield images

    losses = []
    params = pretrain.pretrain_contrastive(
        backbone,
        batches(),
        steps=30,
        lr=3e-3,
        every_block=every_block,
        progress=False,
        on_loss=losses.append,
    )
    model = pretrain.DenseContrast(backbone, every_block=every_block)
    z, _ = model.init_with_output(jax.random.key(0), images[:1, :32, :32])
    assert z.shape == (2 if every_block else 1, 1, 16, 64)  # (levels, batch, patches, dim)
    reference = backbone.init(jax.random.key(0), images[:1, :32, :32])["params"]
    assert jax.tree.structure(params) == jax.tree.structure(reference)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
