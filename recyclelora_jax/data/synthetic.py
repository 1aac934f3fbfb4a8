"""Synthetic domain-shift data: procedural street scenes in a flat "game" style and "real" styles.

Scenes have the 19 classes' geometry (sky over a road converging to a vanishing point, sidewalks,
buildings with fences and walls, trees, terrain, poles with signs and lights, cars, trucks, buses,
trains, people, riders on bicycles and motorcycles). The same geometry is rendered in styles:
`synthetic` (flat per-class colours, GTAV's stand-in) and `photo` / `dusk` (textures, random object
colours, relighting, sensor noise, colour casts) that play the real target domains. They are
written in the real GTAV and Cityscapes layouts so that the real builders read them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from recyclelora_jax.classes import CLASS_NAMES, IGNORE, PALETTE
from recyclelora_jax.data.labels import CITYSCAPES_ID_TO_TRAIN

C = {name: i for i, name in enumerate(CLASS_NAMES)}
STYLES = ("synthetic", "photo", "dusk")
REAL_STYLES = ("photo", "dusk")
TRAIN_TO_ID = np.zeros(256, np.uint8)  # ignore → 0 ("unlabeled")
for _raw, _train in CITYSCAPES_ID_TO_TRAIN.items():
    TRAIN_TO_ID[_train] = _raw

# Flat "game" palette of the synthetic style, one colour per train id: the label palette.
FLAT = np.array(PALETTE, np.float32)
# Base colours of the game style: its own palette (neither the label palette nor the targets').
GAME = np.array(
    [[70, 68, 75], [180, 170, 140], [0, 0, 0], [200, 190, 170], [140, 100, 60],
     [90, 95, 100], [35, 35, 35], [230, 230, 230], [40, 130, 60], [150, 140, 60],
     [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0],
     [0, 0, 0], [120, 60, 40], [0, 0, 0], [0, 0, 0]], np.float32,
)  # fmt: skip
# Base colours of the real styles (object classes get random colours on top, see `_render`).
REAL = np.array(
    [[95, 95, 100], [160, 155, 150], [150, 120, 95], [170, 165, 150], [120, 110, 90],
     [110, 110, 115], [40, 40, 40], [40, 90, 170], [55, 95, 45], [120, 110, 70],
     [185, 205, 230], [90, 70, 60], [60, 60, 90], [150, 30, 30], [200, 200, 200],
     [230, 200, 40], [170, 170, 180], [30, 30, 30], [40, 40, 40]], np.float32,
)  # fmt: skip
VEHICLES = {C["car"], C["truck"], C["bus"], C["train"], C["motorcycle"], C["bicycle"]}
CLOTHED = {C["person"], C["rider"]}


@dataclasses.dataclass
class Canvas:
    """A label map being drawn, with an instance map so styles can colour objects apart."""

    labels: np.ndarray  # (H, W) uint8 train ids
    instances: np.ndarray  # (H, W) int32
    u: np.ndarray  # (1, W) x / W
    v: np.ndarray  # (H, 1) y / H
    count: int = 0

    def paint(self, mask: np.ndarray, cls: int) -> None:
        self.count += 1
        self.labels[mask] = cls
        self.instances[mask] = self.count

    def rect(self, u0: float, u1: float, v0: float, v1: float, cls: int) -> None:
        self.paint((self.u >= u0) & (self.u < u1) & (self.v >= v0) & (self.v < v1), cls)

    def disc(self, uc: float, vc: float, r: float, cls: int, aspect: float) -> None:
        self.paint(((self.u - uc) * aspect) ** 2 + (self.v - vc) ** 2 < r * r, cls)


def make_scene(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Draws one street scene; returns (train-id labels (H, W) uint8, instance ids (H, W))."""
    u = ((np.arange(width) + 0.5) / width)[None, :]
    v = ((np.arange(height) + 0.5) / height)[:, None]
    cv = Canvas(
        np.full((height, width), IGNORE, np.uint8), np.zeros((height, width), np.int32), u, v
    )
    aspect = width / height
    hz, vx = rng.uniform(0.36, 0.48), rng.uniform(0.4, 0.6)
    kr = rng.uniform(0.8, 1.3)
    ks = kr + rng.uniform(0.35, 0.7)
    depth = np.maximum(v - hz, 1e-6)
    cv.paint(np.broadcast_to(v < hz, cv.labels.shape), C["sky"])
    ground = np.broadcast_to(v >= hz, cv.labels.shape)
    cv.paint(ground & (np.abs(u - vx) >= depth * ks), C["terrain"])
    cv.paint(ground & (np.abs(u - vx) < depth * ks), C["sidewalk"])
    cv.paint(ground & (np.abs(u - vx) < depth * kr), C["road"])

    def base(x: float) -> float:  # ground line of the sidewalk's outer edge at column x
        return hz + abs(x - vx) / ks

    for side in (-1, 1):
        edge = 0.0 if side < 0 else 1.0
        x = edge
        while (x - vx) * side > 0.08:
            w = rng.uniform(0.08, 0.2)
            x0, x1 = sorted((x, x - side * w))
            mid = (x0 + x1) / 2
            if rng.random() < 0.75:
                top = rng.uniform(0.03, hz - 0.05)
                cv.paint((u >= x0) & (u < x1) & (v >= top) & (v < base(mid)), C["building"])
                if rng.random() < 0.4:
                    h = rng.uniform(0.03, 0.08)
                    cls = C["fence"] if rng.random() < 0.5 else C["wall"]
                    cv.rect(x0, x1, base(mid) - h, base(mid) + 0.01, cls)
            else:
                r = rng.uniform(0.05, 0.12)
                cv.disc(mid, base(mid) - r * 1.2, r, C["vegetation"], aspect)
            x -= side * w
        for _ in range(rng.integers(1, 3)):  # poles with a sign or a light
            px = vx + side * rng.uniform(0.15, 0.45)
            pb = base(px) + 0.02
            ph = rng.uniform(0.2, 0.35) * (pb - hz + 0.3)
            pw = 0.004 + 0.01 * (pb - hz)
            cv.rect(px - pw, px + pw, pb - ph, pb, C["pole"])
            kind = C["traffic sign"] if rng.random() < 0.5 else C["traffic light"]
            sw, sh = (0.025, 0.035) if kind == C["traffic sign"] else (0.012, 0.06)
            cv.rect(px - sw, px + sw, pb - ph - sh, pb - ph + 0.01, kind)
    if rng.random() < 0.15:
        cv.rect(vx - 0.25, vx + 0.05, hz - 0.09, hz + 0.03, C["train"])
    objects = sorted(rng.uniform(0.1, 1.0, size=rng.integers(2, 7)))
    for t in objects:  # far to near, so near objects occlude
        vb = hz + t * (1 - hz)
        s = t * (1 - hz)
        kind = rng.choice(
            ["car", "car", "car", "truck", "bus", "person", "person", "bicycle", "motorcycle"]
        )
        if kind in ("person", "bicycle", "motorcycle"):
            off = rng.uniform(kr * 0.9, ks) * s * rng.choice([-1, 1])
            _draw_person(cv, vx + off, vb, s, kind, aspect)
        else:
            lane = rng.uniform(-0.7, 0.7) * kr * s
            w = {"car": 0.5, "truck": 0.7, "bus": 0.8}[kind] * s
            h = {"car": 0.35, "truck": 0.7, "bus": 0.75}[kind] * s
            cls = C[kind]
            cv.rect(vx + lane - w / 2, vx + lane + w / 2, vb - h * 0.6, vb, cls)
            cv.rect(vx + lane - w / 3, vx + lane + w / 3, vb - h, vb - h * 0.55, cls)
    if rng.random() < 0.3:  # ego-vehicle bonnet: ignored, as in Cityscapes
        cv.paint((v > 0.93) & (np.abs(u - 0.5) < 0.45), IGNORE)
    return cv.labels, cv.instances


def _draw_person(cv: Canvas, x: float, vb: float, s: float, kind: str, aspect: float) -> None:
    """A pedestrian, or a rider on a bicycle or motorcycle, standing at ground row `vb`."""
    h = 0.55 * s
    if kind == "person":
        cv.rect(x - 0.06 * s, x + 0.06 * s, vb - h * 0.8, vb, C["person"])
        cv.disc(x, vb - h * 0.9, 0.1 * h, C["person"], aspect)
        return
    wheel = 0.14 * s
    vehicle = C[kind]
    for dx in (-0.13 * s, 0.13 * s):
        cv.disc(x + dx, vb - wheel, wheel, vehicle, aspect)
    cv.rect(x - 0.13 * s, x + 0.13 * s, vb - 2.2 * wheel, vb - wheel * 1.2, vehicle)
    cv.rect(x - 0.05 * s, x + 0.05 * s, vb - h * 1.1, vb - 2.0 * wheel, C["rider"])
    cv.disc(x, vb - h * 1.2, 0.1 * h, C["rider"], aspect)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid, bicubically upsampled."""
    h, w = shape
    grid = rng.uniform(-1, 1, (max(2, cells * h // w), cells)).astype(np.float32)
    return np.clip(cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC), -1, 1)


def _hsv_colours(
    rng: np.random.Generator, n: int, sat: tuple, val: tuple, hue: tuple = (0, 6)
) -> np.ndarray:
    """`n` RGB colours (0-255) of random hue (0 red, 2 green, 4 blue) and saturation/value."""
    hue = rng.uniform(*hue, n)
    s, v = rng.uniform(*sat, n), rng.uniform(*val, n)
    k = (np.float32([5, 3, 1])[None] + hue[:, None]) % 6
    rgb = v[:, None] * (1 - s[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1))
    return (255 * rgb).astype(np.float32)


def _render_game(labels: np.ndarray, instances: np.ndarray, rng: np.random.Generator):
    """The source style: a game's rendering statistics (GTAV's role), distinct from the targets'.

    Colours vary within a class (per-instance tints, any hue for vehicles and clothing, facades
    of any colour), surfaces carry crisp procedural textures (paving grid, grass rows, leaf
    stipple, lit window grids), lighting is hard per-object shading under a clean sky gradient,
    with no sensor noise, colour cast or blur -- so a colour lookup does not solve it and what
    carries over to the targets is shape and context.
    """
    h, w = labels.shape
    safe = np.where(labels == IGNORE, 0, labels)
    n = int(instances.max()) + 1
    tint = rng.uniform(0.75, 1.25, (n, 3)) * rng.uniform(0.7, 1.3, (n, 1))
    img = GAME[safe] * tint.astype(np.float32)[instances]
    objects = np.isin(labels, sorted(VEHICLES | CLOTHED))
    img[objects] = _hsv_colours(rng, n, (0.5, 1.0), (0.35, 1.0))[instances[objects]]
    building = labels == C["building"]
    facade = _hsv_colours(rng, n, (0.0, 0.5), (0.3, 0.9))[instances]
    img[building] = facade[building]
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    fine = rng.uniform(-1, 1, (h, w)).astype(np.float32)
    img[building & (rows % 7 < 4) & (cols % 6 < 3)] = np.float32([150, 190, 215])
    paving = (rows % 6 == 0) | (cols % 9 == 0)
    img[(labels == C["sidewalk"]) & paving] *= 0.7
    img[labels == C["terrain"]] *= (0.85 + 0.15 * (rows % 3 == 0))[..., None].repeat(w, 1)[
        labels == C["terrain"]
    ]
    leaves = cv2.blur(fine, (3, 3)) > 0.15
    img[(labels == C["vegetation"]) & leaves] *= 1.35
    img[labels == C["road"]] += (6 * fine[labels == C["road"]])[:, None]
    sky = labels == C["sky"]
    top = _hsv_colours(rng, 1, (0.4, 0.8), (0.6, 1.0), (3.3, 4.3))[0]
    warm = rng.random() < 0.3  # a sunset horizon, else a paler blue
    horizon = _hsv_colours(rng, 1, (0.2, 0.6), (0.8, 1.0), (0.2, 0.9) if warm else (3.2, 4.0))[0]
    frac = (rows / h).repeat(w, 1)[sky][:, None]
    img[sky] = (1 - frac) * top + frac * horizon
    shade = rng.uniform(0.7, 1.1, n).astype(np.float32)
    img *= shade[instances][..., None]
    img = (img / 255) ** rng.uniform(0.8, 1.2) * 255
    img[labels == IGNORE] = 20
    return np.clip(img, 0, 255).round().astype(np.uint8)


def render(labels: np.ndarray, instances: np.ndarray, style: str, rng: np.random.Generator):
    """Renders a scene in `style`; returns (H, W, 3) uint8 RGB."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose from {STYLES}")
    safe = np.where(labels == IGNORE, 0, labels)
    n = int(instances.max()) + 1
    if style == "synthetic":
        return _render_game(labels, instances, rng)
    colours = REAL[safe] * rng.uniform(0.8, 1.2, (n, 1)).astype(np.float32)[instances]
    random_colour = rng.uniform(20, 235, (n, 3)).astype(np.float32)[instances]
    objects = np.isin(labels, sorted(VEHICLES | CLOTHED))
    img = np.where(objects[..., None], random_colour, colours)
    fine = rng.normal(0, 1, labels.shape).astype(np.float32)
    blotch = _smooth_noise(rng, labels.shape, 24)
    texture = {
        C["road"]: 10,
        C["sidewalk"]: 8,
        C["building"]: 18,
        C["vegetation"]: 35,
        C["terrain"]: 25,
    }
    amp = np.zeros(256, np.float32)
    for cls, a in texture.items():
        amp[cls] = a
    img += ((0.5 * fine + blotch) * amp[labels])[..., None]
    windows = (np.arange(labels.shape[0])[:, None] // 4 % 3 == 0) & (
        np.arange(labels.shape[1])[None, :] // 4 % 3 == 0
    )
    img[(labels == C["building"]) & windows] *= 0.6
    img[labels == C["sky"]] += 25 * _smooth_noise(rng, labels.shape, 6)[labels == C["sky"], None]
    light = 1.0 + 0.25 * _smooth_noise(rng, labels.shape, 3)
    img *= light[..., None]
    if style == "dusk":
        img = img * np.float32([0.75, 0.55, 0.6]) + np.float32([30, 10, 25])
        img = 0.7 * img + 0.3 * img.mean()
        sigma = 9.0
    else:
        sigma = 4.0
    img += rng.normal(0, sigma, img.shape).astype(np.float32)
    img = cv2.GaussianBlur(np.clip(img, 0, 255), (3, 3), 0.7)
    return img.round().astype(np.uint8)


def make_example(
    seed: int, index: int, style: str, size: tuple[int, int] = (256, 128)
) -> tuple[np.ndarray, np.ndarray]:
    """Image (H, W, 3) uint8 and train-id label (H, W) of scene `index` of stream `seed`."""
    labels, instances = make_scene(np.random.default_rng([seed, index]), *size)
    style_rng = np.random.default_rng([seed, index, *style.encode()])
    return render(labels, instances, style, style_rng), labels


def write_png(path: Path, array: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Writes an RGB, grey, or (with `palette`) palette PNG, making parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array)
    if palette is not None:
        im.putpalette(palette.astype(np.uint8).ravel().tolist())  # grey indices → palette
    im.save(path, compress_level=1)


def write_gtav(
    root: Path, num: int, size=(256, 128), seed: int = 0, style: str = "synthetic"
) -> Path:
    """Writes `num` scenes (default: synthetic style) as GTAV: images/NNNNN.png, labels/NNNNN.png
    (palette PNGs of label ids)."""
    palette = np.zeros((256, 3), np.uint8)
    palette[TRAIN_TO_ID[: len(FLAT)]] = FLAT.astype(np.uint8)
    for i in range(num):
        image, label = make_example(seed, i, style, size)
        write_png(root / "images" / f"{i + 1:05d}.png", image)
        write_png(root / "labels" / f"{i + 1:05d}.png", TRAIN_TO_ID[label], palette)
    return root


CITIES = {"train": ("aachen", "bochum"), "val": ("frankfurt",)}


def write_cityscapes(
    root: Path, style: str, num_train: int, num_val: int, size=(256, 128), seed: int = 1
) -> Path:
    """Writes scenes in `style` in Cityscapes' layout (leftImg8bit/ and gtFine/ labelIds)."""
    index = 0
    for split, count in (("train", num_train), ("val", num_val)):
        cities = CITIES[split]
        for k in range(count):
            city = cities[k % len(cities)]
            stem = f"{city}_{k // len(cities):06d}_000019"
            image, label = make_example(seed, index, style, size)
            index += 1
            write_png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image)
            write_png(
                root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", TRAIN_TO_ID[label]
            )
    return root


def write_synthetic(
    root: str | Path,
    *,
    styles: Sequence[str] = REAL_STYLES,
    num_train: int = 200,
    num_val: int = 50,
    size: tuple[int, int] = (256, 128),
    seed: int = 0,
) -> dict[str, Path]:
    """Writes `root/gtav` (synthetic style) and `root/cityscapes_<style>` for each style.

    Returns the manual-download folder of each dataset by name. Scenes differ between datasets
    (distinct seeds); the same arguments always give the same files.
    """
    root = Path(root)
    out = {"gtav": write_gtav(root / "gtav", num_train + num_val, size, seed)}
    for k, style in enumerate(styles):
        out[f"cityscapes_{style}"] = write_cityscapes(
            root / f"cityscapes_{style}", style, num_train, num_val, size, seed + 1 + k
        )
    return out


def prepare_synthetic_demo(
    root: str | Path, data_dir: str | Path, **kwargs
) -> dict[str, tuple[str, Path]]:
    """Writes the synthetic datasets (`write_synthetic` kwargs) and builds their TFDS versions.

    Returns, per dataset name, the builder name and the TFDS data_dir to read it from
    (`dg_gtav` for `gtav`, `dg_cityscapes` for each `cityscapes_<style>`, each in its own dir).
    """
    from recyclelora_jax.data.prepare import prepare

    out = {}
    for name, manual_dir in write_synthetic(root, **kwargs).items():
        builder = "dg_gtav" if name == "gtav" else "dg_cityscapes"
        prepare(builder, manual_dir, Path(data_dir) / name, num_workers=1)
        out[name] = (builder, Path(data_dir) / name)
    return out


READY = "READY"


def prepare_synthetic_once(root: str | Path, data_dir: str | Path, **kwargs) -> Path:
    """`prepare_synthetic_demo`, skipped when `data_dir` is complete: its marker is written
    last, so an interrupted build is redone. Returns `data_dir`."""
    data_dir = Path(data_dir)
    if not (data_dir / READY).exists():
        prepare_synthetic_demo(root, data_dir, **kwargs)
        (data_dir / READY).write_text("ok\n")
    return data_dir
