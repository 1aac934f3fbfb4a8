"""The mmseg training augmentation of RECIPE.md §6, checked against its definition."""

import cv2
import numpy as np
import pytest
import scipy.stats

from recyclelora_jax.data import transforms


def test_scales_and_normalisation_constants():
    assert transforms.SCALES == (256, 307, 358, 409, 460, 512, 563, 614, 665, 716, 768, 819, 870,
                                 921, 972, 1024)  # fmt: skip
    assert transforms.MEAN.tolist() == pytest.approx([123.675, 116.28, 103.53], abs=1e-5)
    assert transforms.STD.tolist() == pytest.approx([58.395, 57.12, 57.375], abs=1e-5)
    img = np.array([[[124, 116, 104], [0, 255, 7]]], np.uint8)
    want = (img.astype(np.float64) - [123.675, 116.28, 103.53]) / [58.395, 57.12, 57.375]
    np.testing.assert_allclose(transforms.normalize(img), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("hw", "short", "want"),
    [((1052, 1914), 512, (512, 932)), ((1052, 1914), 1024, (1024, 1863)),
     ((1024, 2048), 1024, (1024, 2048)), ((500, 3000), 1024, (341, 2048)),
     ((1914, 1052), 307, (559, 307)),
     ((1000, 1999), 512, (512, 1023)),  # 1023.488: rounds down
     ((999, 1999), 512, (512, 1025)),  # 1024.51: rounds up, not truncated
     ((700, 3000), 1024, (478, 2048)),  # capped: 477.87 rounds up
     ((3, 7), 256, (256, 597))],  # 597.33
)  # fmt: skip
def test_shortest_edge_size(hw, short, want):
    assert transforms.shortest_edge_size(*hw, short) == want


def test_resized_shorter_side_comes_from_the_16_scales(monkeypatch):
    sizes = []
    resize = transforms.resize
    monkeypatch.setattr(
        transforms, "resize", lambda im, lab, s: sizes.append(s) or resize(im, lab, s)
    )
    image = np.zeros((60, 100, 3), np.uint8)
    label = np.tile(np.arange(100, dtype=np.uint8) // 10, (60, 1))
    for seed in range(64):
        transforms.train_augment(image, label, np.random.default_rng(seed), (32, 32))
    shorts = {min(s) for s in sizes}
    assert shorts <= set(transforms.SCALES) and len(shorts) >= 12


def test_crop_obeys_cat_max_ratio():
    label = np.zeros((200, 200), np.uint8)
    label[:, 150:] = 1  # most 64x64 crops are pure class 0
    label[:5] = 255
    for seed in range(50):
        rng = np.random.default_rng(seed)
        y, x = transforms.crop_box(label, (64, 64), rng)
        replay = np.random.default_rng(seed)
        draws = [(int(replay.integers(0, 137)), int(replay.integers(0, 137))) for _ in range(11)]
        ok = [transforms.crop_ok(label[a : a + 64, b : b + 64], 0.75) for a, b in draws]
        want = draws[ok.index(True)] if True in ok[:10] else draws[10]
        assert (y, x) == want
        crop = label[y : y + 64, x : x + 64]
        counts = np.bincount(crop[crop != 255].ravel())
        assert (counts.max() / counts.sum() < 0.75) == ok[draws.index(want)]


def test_crop_ok_definition():
    assert not transforms.crop_ok(np.zeros((4, 4), np.uint8), 0.75)  # one class
    two = np.array([[0, 0, 0, 1]], np.uint8)
    assert not transforms.crop_ok(two, 0.75)  # 75 % is not below 75 %
    assert transforms.crop_ok(np.array([[0, 0, 1, 1, 255, 255, 255]], np.uint8), 0.75)


def _stripes():
    widths = [7, 13, 5, 21, 9, 17, 11, 3, 19]  # asymmetric, so a missed flip shows
    label = np.repeat(np.arange(len(widths), dtype=np.uint8), widths)[None].repeat(64, 0)
    grey = (label.astype(np.int32) * 25 + 20).astype(np.uint8)
    return np.repeat(grey[..., None], 3, -1), label


def test_flip_and_crop_keep_image_and_label_aligned():
    image, label = _stripes()
    flipped = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)  # scale 64 = the image height: no resampling blur
        img, lab = transforms.train_augment(image, label, rng, (48, 48), scales=(64,))
        img = img * transforms.STD + transforms.MEAN
        interior = (
            (lab[:, 1:-1] == lab[:, :-2]) & (lab[:, 1:-1] == lab[:, 2:]) & (lab[:, 1:-1] < 255)
        )
        values = img[:, 1:-1, 0][interior]
        classes = lab[:, 1:-1][interior]
        for c in np.unique(classes):  # grey pixels: photometric is one map of the grey level
            assert np.ptp(values[classes == c]) < 1e-3, seed
        first = lab[lab < 255]
        flipped += int(first[0] > first[-1])
    assert 8 <= flipped <= 32  # about half the crops are flipped


def test_photometric_never_touches_labels(monkeypatch):
    image = np.random.default_rng(0).integers(0, 256, (80, 120, 3), dtype=np.uint8)
    label = np.random.default_rng(1).integers(0, 19, (80, 120), dtype=np.uint8)
    with_pm = transforms.train_augment(image, label, np.random.default_rng(5), (64, 64))
    monkeypatch.setattr(transforms, "photometric_distortion", lambda img, rng: img)
    without = transforms.train_augment(image, label, np.random.default_rng(5), (64, 64))
    np.testing.assert_array_equal(with_pm[1], without[1])
    assert not np.array_equal(with_pm[0], without[0])


def _mmseg_photometric(pixel: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's `PhotoMetricDistortion` on one RGB pixel, written from its definition: brightness
    (p 0.5, delta U(-32, 32)), a coin for contrast first or last (p 0.5, alpha U(0.5, 1.5)),
    saturation (p 0.5, alpha U(0.5, 1.5)), hue (p 0.5, integer delta in [-18, 18) on 0..179);
    each step clips to 0..255 and truncates to uint8."""

    def affine(x, alpha=1.0, beta=0.0):
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def hsv_step(img, channel, fn):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[..., channel] = fn(hsv[..., channel])
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)

    img = pixel
    brightness, contrast_first = rng.random() < 0.5, rng.random() < 0.5
    contrast, saturation, hue = rng.random(3) < 0.5
    if brightness:
        img = affine(img, beta=rng.uniform(-32, 32))
    if contrast and contrast_first:
        img = affine(img, alpha=rng.uniform(0.5, 1.5))
    if saturation:
        img = hsv_step(img, 1, lambda s: affine(s, alpha=rng.uniform(0.5, 1.5)))
    if hue:
        delta = int(np.floor(rng.uniform(-18, 18)))
        img = hsv_step(img, 0, lambda h: (h.astype(int) + delta) % 180)
    if contrast and not contrast_first:
        img = affine(img, alpha=rng.uniform(0.5, 1.5))
    return img


@pytest.mark.parametrize("rgb", [(128, 128, 128), (200, 0, 0), (60, 150, 90), (250, 240, 20)])
def test_photometric_distribution_matches_mmseg_definition(rgb):
    """Per channel, the outputs over 3000 seeds and 3000 independent draws of the definition
    come from one distribution (two-sample KS, p > 1e-4): ranges, probabilities and order."""
    pixel = np.array([[rgb]], np.uint8)
    n = 3000
    ours = np.stack(
        [transforms.photometric_distortion(pixel, np.random.default_rng(s)) for s in range(n)]
    )
    ref_rng = np.random.default_rng(12345)
    want = np.stack([_mmseg_photometric(pixel, ref_rng) for _ in range(n)])
    for c in range(3):
        result = scipy.stats.ks_2samp(ours[..., c].ravel(), want[..., c].ravel())
        assert result.pvalue > 1e-4, (rgb, c, result)
    unchanged = (ours == pixel).all(axis=(1, 2, 3)).mean()
    assert unchanged == pytest.approx((want == pixel).all(axis=(1, 2, 3)).mean(), abs=0.04)


def test_photometric_brightness_contrast_extremes_on_grey():
    """Grey 128 (saturation and hue leave it): brightness then contrast spans at most
    (128 - 32) * 0.5 .. (128 + 32) * 1.5, contrast then brightness 128 * 0.5 - 32 .. 128 * 1.5
    + 32."""
    grey = np.full((1, 1, 3), 128, np.uint8)
    out = np.array([transforms.photometric_distortion(grey, np.random.default_rng(s))[0, 0, 0]
                    for s in range(4000)])  # fmt: skip
    assert out.min() >= 32 and out.max() <= 240
    assert out.min() <= 55 and out.max() >= 225  # the extremes are reached
    brightness_only = out[(np.abs(out.astype(int) - 128) <= 32)]
    assert len(brightness_only) > 0.4 * len(out)


def test_photometric_hue_shift_range():
    """On a saturated red (hue 0) every step but hue keeps the hue, so the output hue is the
    drawn shift: an integer in [-18, 17], drawn with p 0.5 (a few pixels whose saturation was
    halved carry ±3 of 8-bit rounding)."""
    red = np.array([[[200, 0, 0]]], np.uint8)
    shifts = []
    for seed in range(3000):
        out = transforms.photometric_distortion(red, np.random.default_rng(seed))
        hue = int(cv2.cvtColor(out, cv2.COLOR_RGB2HSV)[0, 0, 0])
        shifts.append((hue + 90) % 180 - 90)
    shifts = np.array(shifts)
    assert np.mean((shifts < -18) | (shifts > 17)) < 0.005 and np.abs(shifts).max() <= 22
    assert np.mean(shifts <= -17) > 0.01 and np.mean(shifts >= 16) > 0.01
    assert np.mean(np.abs(shifts) <= 1) == pytest.approx(0.5 + 0.5 * 3 / 36, abs=0.05)


def test_photometric_distortion_ranges_and_hue_semantics():
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    grey = np.full((4, 4, 3), 77, np.uint8)
    for seed in range(30):
        out = transforms.photometric_distortion(image, np.random.default_rng(seed))
        assert out.dtype == np.uint8 and out.shape == image.shape
        g = transforms.photometric_distortion(grey, np.random.default_rng(seed))
        assert (g == g[0, 0, 0]).all()  # saturation and hue leave grey pixels grey
    red = np.zeros((1, 1, 3), np.uint8)
    red[..., 0] = 200
    hsv = transforms.cv2.cvtColor(red, transforms.cv2.COLOR_RGB2HSV)
    assert hsv[0, 0].tolist() == [0, 255, 200]  # OpenCV 8-bit hue scale: 0..179


def test_small_images_are_padded_with_ignore():
    image = np.full((20, 30, 3), 200, np.uint8)
    label = np.tile(np.arange(30, dtype=np.uint8) % 3, (20, 1))
    rng = np.random.default_rng(0)
    img, lab = transforms.train_augment(image, label, rng, (600, 600), scales=(256,))
    h, w = transforms.shortest_edge_size(20, 30, 256)
    assert img.shape == (600, 600, 3) and lab.dtype == np.int32
    assert (lab[h:] == 255).all() and (lab[:, w:] == 255).all() and (lab[:h, :w] < 255).all()
    assert (img[h:] == 0).all() and (img[:, w:] == 0).all()


def test_raw_padding_is_mmcv_pad_then_flip_and_photometric():
    """g2cbm/c2bm: the crop is padded as mmcv's ``Pad(size, pad_val=dict(img=0, seg=255))``
    does, in raw pixel space, before the flip and the photometric distortion: padded pixels
    are black shifted by the distortion (not the normalised 0), and can end up on the left."""
    import _mmseg  # noqa: F401  (mmcv importable without its compiled kernels)
    from mmcv.transforms import Pad

    from recyclelora_jax.data.transforms import MEAN, STD, pad, train_augment

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 27, 3), dtype=np.uint8)
    label = rng.integers(0, 19, (20, 27), dtype=np.uint8)
    ref = Pad(size=(32, 32), pad_val=dict(img=0, seg=255))(
        dict(img=image, gt_seg_map=label, seg_fields=["gt_seg_map"], img_shape=(20, 27))
    )
    ours = pad(image, label, (32, 32))
    np.testing.assert_array_equal(ours[0], ref["img"])
    np.testing.assert_array_equal(ours[1], ref["gt_seg_map"])

    left, shifted = 0, 0
    for seed in range(16):
        img, lab = train_augment(
            image, label, np.random.default_rng(seed), (32, 32), (16,), 64, pad_raw=True
        )
        padded = lab == 255
        assert padded.any()  # a 16-px shorter side never fills the 32-px crop
        left += bool(padded[:, 0].all())
        black = np.round(img[padded] * STD + MEAN)
        assert (black == black[0]).all()  # one colour: black after this crop's distortion
        shifted += bool(black[0].any())
    assert left and left < 16 and shifted  # flipped to the left sometimes; brightness moves it
