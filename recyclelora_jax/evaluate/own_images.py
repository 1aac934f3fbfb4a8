"""Segment a folder of the user's own images with a trained model (no labels needed).

Photos are decoded like the datasets (OpenCV; 16-bit images scaled to 8 bits), resized to the
Cityscapes test scale like the evaluation profiles (a 4000x3000 photo would not fit one forward;
``scale=None`` keeps the native size), and slid over with a number of windows per call bounded by
a memory budget; the predicted ids are brought back to the photo's size (nearest).
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
from tqdm import tqdm

from recyclelora_jax.data import codecs
from recyclelora_jax.data.evaluation import PROFILES
from recyclelora_jax.data.transforms import keep_ratio_size, normalize, resize
from recyclelora_jax.evaluate.inference import predict_logits
from recyclelora_jax.evaluate.visualize import colorize
from recyclelora_jax.models.segmentor import Segmentor

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
TEST_SCALE = PROFILES["cityscapes"].scale
MEMORY_BUDGET = 2 << 30  # bytes of activations per forward call


def window_bytes(model: Segmentor, crop: tuple[int, int]) -> int:
    """Rough float32 activation peak of one crop: one layer's attention scores plus its hidden
    activations (what grows with the crop; weights are shared across windows)."""
    arch = model.backbone.arch
    tokens = math.prod(c // arch.patch_size for c in crop) + 1 + arch.num_register_tokens
    return 4 * (2 * arch.num_heads * tokens**2 + 4 * tokens * (arch.embed_dim + arch.mlp_hidden))


def windows_per_call(model: Segmentor, crop: int, budget: int = MEMORY_BUDGET) -> int:
    return max(1, budget // window_bytes(model, (crop, crop)))


def segment_folder(
    model: Segmentor,
    params: dict,
    cfg: ml_collections.ConfigDict,
    folder: str | Path,
    out: str | Path,
    *,
    scale: tuple[int, int] | None = TEST_SCALE,
    memory_budget: int = MEMORY_BUDGET,
) -> list[Path]:
    """Writes ``<out>/<name>.png`` (image | colourised prediction) and ``<name>_ids.png`` (train
    ids) for every image in ``folder``, with the config's inference mode, at the photo's size."""
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise FileNotFoundError(f"no image folder at {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(SUFFIXES)}) in {folder}")
    out.mkdir(parents=True, exist_ok=True)
    predict = jax.jit(lambda x: model.apply({"params": params}, x, method=Segmentor.predict))
    e = cfg.eval
    per_call = windows_per_call(model, e.crop_size, memory_budget)
    written = []
    for file in tqdm(files, desc="segment"):
        image = codecs.decode_image(file.read_bytes(), str(file))
        h, w = image.shape[:2]
        test = image if scale is None else resize(image, None, keep_ratio_size(h, w, scale))[0]
        logits = predict_logits(
            predict, jnp.asarray(normalize(test))[None], e.mode, e.crop_size, e.stride, per_call
        )
        ids = np.asarray(jnp.argmax(logits[0], -1), np.uint8)
        ids = cv2.resize(ids, (w, h), interpolation=cv2.INTER_NEAREST)
        Image.fromarray(np.concatenate([image, colorize(ids)], axis=1)).save(
            out / f"{file.stem}.png"
        )
        Image.fromarray(ids).save(out / f"{file.stem}_ids.png")
        written.append(out / f"{file.stem}.png")
    return written
