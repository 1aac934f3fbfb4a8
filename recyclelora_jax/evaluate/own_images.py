"""Segment a folder of the user's own images with a trained model (no labels needed)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from recyclelora_jax.data.transforms import normalize
from recyclelora_jax.evaluate.inference import predict_logits
from recyclelora_jax.evaluate.visualize import colorize
from recyclelora_jax.models.segmentor import Segmentor

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def segment_folder(
    model: Segmentor,
    params: dict,
    cfg: ml_collections.ConfigDict,
    folder: str | Path,
    out: str | Path,
) -> list[Path]:
    """Writes ``<out>/<name>.png`` (image | colourised prediction) and ``<name>_ids.png`` (train
    ids) for every image in ``folder``, with the config's inference mode."""
    folder, out = Path(folder), Path(out)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(SUFFIXES)}) in {folder}")
    out.mkdir(parents=True, exist_ok=True)
    predict = jax.jit(lambda x: model.apply({"params": params}, x, method=Segmentor.predict))
    e = cfg.eval
    written = []
    for file in tqdm(files, desc="segment"):
        try:
            image = np.asarray(Image.open(file).convert("RGB"))
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read image {file}: {err}") from err
        logits = predict_logits(
            predict, jnp.asarray(normalize(image))[None], e.mode, e.crop_size, e.stride
        )
        ids = np.asarray(jnp.argmax(logits[0], -1), np.uint8)
        Image.fromarray(np.concatenate([image, colorize(ids)], axis=1)).save(
            out / f"{file.stem}.png"
        )
        Image.fromarray(ids).save(out / f"{file.stem}_ids.png")
        written.append(out / f"{file.stem}.png")
    return written
