"""Palette against cityscapesscripts' label table; comparison PNG read back pixel by pixel."""

import numpy as np
import pytest
from cityscapesscripts.helpers.labels import trainId2label
from PIL import Image

from recyclelora_jax.classes import MEAN_RGB, STD_RGB
from recyclelora_jax.classes import PALETTE as CITYSCAPES_PALETTE
from recyclelora_jax.evaluate.visualize import (
    colorize,
    save_comparison,
    to_uint8_image,
)

RNG = np.random.default_rng(0)


def test_colorize_uses_cityscapes_colours_and_black_for_ignore():
    ids = np.array([[*range(19), 255, 19, -1]])
    colours = colorize(ids)
    expected = [trainId2label[t].color for t in range(19)] + [(0, 0, 0)] * 3
    np.testing.assert_array_equal(colours[0], np.array(expected, np.uint8))
    assert len(CITYSCAPES_PALETTE) == 19


def test_normalisation_round_trip():
    pixels = RNG.integers(0, 256, (5, 7, 3)).astype(np.uint8)
    normalised = (pixels - np.array(MEAN_RGB)) / np.array(STD_RGB)
    np.testing.assert_array_equal(to_uint8_image(normalised.astype(np.float32)), pixels)
    assert to_uint8_image(pixels) is pixels


def test_save_comparison_grid(tmp_path):
    gap = 4
    rows = []
    for h, w in [(30, 40), (20, 50)]:
        image = RNG.normal(size=(h // 2, w // 2, 3)).astype(np.float32)  # test-resized input
        label = RNG.integers(0, 19, (h, w))
        label[:3] = 255
        rows.append((image, label, RNG.integers(0, 19, (h, w))))
    path = tmp_path / "grid.png"
    save_comparison(path, rows, gap=gap)
    grid = np.asarray(Image.open(path).convert("RGB"))
    assert grid.shape == (30 + gap + 20, 3 * 50 + 2 * gap, 3)
    top = 0
    for image, label, pred in rows:
        h, w = label.shape
        strip = grid[top : top + h]
        shown = Image.fromarray(to_uint8_image(image)).resize((w, h), Image.BILINEAR)
        np.testing.assert_array_equal(strip[:, :w], np.asarray(shown))
        np.testing.assert_array_equal(strip[:, w + gap : 2 * w + gap], colorize(label))
        np.testing.assert_array_equal(strip[:, 2 * (w + gap) : 3 * w + 2 * gap], colorize(pred))
        assert (strip[:, w : w + gap] == 255).all()
        top += h + gap


def test_bad_inputs_raise(tmp_path):
    with pytest.raises(ValueError, match="no rows"):
        save_comparison(tmp_path / "x.png", [])
    with pytest.raises(ValueError, match="differ in shape"):
        save_comparison(
            tmp_path / "x.png", [(np.zeros((4, 4, 3)), np.zeros((4, 4)), np.zeros((4, 5)))]
        )
    with pytest.raises(ValueError, match=r"\(H, W\) id map"):
        colorize(np.zeros((2, 2, 1), int))
