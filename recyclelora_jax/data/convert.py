"""Turns (image file, label file) pairs into stored examples: validated, mapped, PNG-encoded.

The work is split into chunks converted in parallel; each finished chunk is written atomically to
a cache folder, so an interrupted `prepare` resumes where it stopped instead of redoing it. A
chunk is plain arrays and JSON in an `.npz` read with `allow_pickle=False`: whoever can write into
a shared data folder can spoil a cached chunk (it is then converted again) but not run code.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import os
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tqdm
from PIL import Image

from recyclelora_jax.data import codecs
from recyclelora_jax.data.labels import LabelTable

log = logging.getLogger(__name__)
CHUNK_SIZE = 64  # examples per cached chunk: the unit of resumption and of parallel work


@dataclasses.dataclass(frozen=True)
class Pair:
    """One image and its label file; `name` is the file name stored with the example."""

    image: Path
    label: Path
    name: str


@dataclasses.dataclass(frozen=True)
class ConvertTask:
    """How to turn a pair into an example (picklable, it travels to worker processes)."""

    table: LabelTable
    read_label: Callable[[bytes, str], np.ndarray] = codecs.decode_label
    halve: bool = False  # Mapillary evaluation protocol: `halve` (the official tool's rule)


def halve(
    image: np.ndarray, label: np.ndarray, mode: str = "official"
) -> tuple[np.ndarray, np.ndarray]:
    """Mapillary at half resolution. ``official``: the release's ``mapillary_resize`` tool -- PIL
    antialiased bicubic to ``(W // 2, H // 2)``, saved as JPEG quality 75 (here: the pixels that
    file decodes to, with OpenCV as mmseg reads it), labels PIL nearest (pixel 2i + 1).
    ``opencv``: this project's earlier rule -- sizes rounded like mmcv ``rescale``, OpenCV cubic
    without antialias, no JPEG, nearest at pixel 2i."""
    h, w = label.shape
    if mode == "opencv":
        size = (int(w * 0.5 + 0.5), int(h * 0.5 + 0.5))
        image = cv2.resize(image, size, interpolation=cv2.INTER_CUBIC)
        return image, cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
    if mode != "official":
        raise ValueError(f"unknown halving mode {mode!r} (official or opencv)")
    size = (w // 2, h // 2)
    small = Image.fromarray(image).resize(size, Image.Resampling.BICUBIC)
    jpeg = io.BytesIO()
    small.save(jpeg, format="JPEG", quality=75)
    image = codecs.decode_image(jpeg.getvalue(), "<halved image>")
    label = np.asarray(Image.fromarray(label).resize(size, Image.Resampling.NEAREST))
    return image, label


def convert_pair(pair: Pair, task: ConvertTask) -> dict:
    """Reads, validates and encodes one pair; raises `ValueError` naming the offending file."""
    image_bytes = pair.image.read_bytes()
    image = codecs.decode_image(image_bytes, str(pair.image))
    raw = task.read_label(pair.label.read_bytes(), str(pair.label))
    if raw.shape != image.shape[:2]:
        raise ValueError(
            f"{pair.label}: label size {raw.shape[::-1]} differs from image size "
            f"{image.shape[1::-1]} of {pair.image}"
        )
    label = task.table.map(raw, str(pair.label))
    if task.halve:
        image, label = halve(image, label)
        image_bytes = codecs.encode_png(image)
    return {"image": image_bytes, "label": codecs.encode_png(label), "file_name": pair.name}


def _convert_chunk(pairs: Sequence[Pair], task: ConvertTask, skip_invalid: bool, out: Path) -> int:
    """Converts a chunk into `out` (written atomically); returns the number skipped."""
    examples, skipped = [], []
    for pair in pairs:
        try:
            examples.append(convert_pair(pair, task))
        except (ValueError, OSError) as err:
            if not skip_invalid:
                raise ValueError(f"{err} (use --skip_invalid to skip bad files)") from err
            skipped.append(str(err))
    _write_chunk(out, examples, skipped)
    return len(skipped)


def _write_chunk(out: Path, examples: list[dict], skipped: list[str]) -> None:
    """Encoded images and labels as two byte buffers with end offsets, names as JSON."""
    arrays = {}
    for key in ("image", "label"):
        blobs = [e[key] for e in examples]
        arrays[f"{key}_bytes"] = np.frombuffer(b"".join(blobs), np.uint8)
        arrays[f"{key}_ends"] = np.cumsum([len(b) for b in blobs], dtype=np.int64)
    text = json.dumps({"file_names": [e["file_name"] for e in examples], "skipped": skipped})
    arrays["json"] = np.frombuffer(text.encode(), np.uint8)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, out)


def _read_chunk(path: Path) -> dict | None:
    """A chunk written by `_write_chunk`, or None if it is missing or not one (never unpickled)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            info = json.loads(z["json"].tobytes())
            names, skipped = info["file_names"], info["skipped"]
            columns = {}
            for key in ("image", "label"):
                data, ends = z[f"{key}_bytes"].tobytes(), z[f"{key}_ends"].tolist()
                if len(ends) != len(names) or (ends and ends[-1] != len(data)):
                    return None
                columns[key] = [data[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile):
        return None
    examples = [
        {"image": i, "label": lab, "file_name": n}
        for i, lab, n in zip(columns["image"], columns["label"], names, strict=True)
    ]
    return {"examples": examples, "skipped": [str(r) for r in skipped]}


def _chunk_key(pairs: Sequence[Pair], task: ConvertTask) -> str:
    """Names a chunk by its inputs (paths, sizes, mtimes) and options: stale caches go unused."""
    halving = task.halve and "official"  # the halving rule changed: caches of the old one unused
    h = hashlib.sha1(repr((task.table.name, task.table.lut.tobytes(), halving)).encode())
    for p in pairs:
        for f in (p.image, p.label):
            st = f.stat()
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def fill_cache(
    pairs: Sequence[Pair],
    task: ConvertTask,
    cache_dir: Path,
    *,
    num_workers: int = 1,
    skip_invalid: bool = False,
    chunk_size: int | None = None,
) -> list[tuple[Sequence[Pair], Path]]:
    """Converts the chunks of `pairs` not cached yet; returns every (chunk, cache file)."""
    chunk_size = chunk_size or CHUNK_SIZE
    cache_dir.mkdir(parents=True, exist_ok=True)
    chunks = [pairs[i : i + chunk_size] for i in range(0, len(pairs), chunk_size)]
    paths = [cache_dir / f"chunk{i:06d}-{_chunk_key(c, task)}.npz" for i, c in enumerate(chunks)]
    todo = [i for i, p in enumerate(paths) if not p.exists()]
    if len(todo) < len(chunks):
        log.info(
            "Resuming: %d of %d chunks already converted", len(chunks) - len(todo), len(chunks)
        )
    bar = tqdm.tqdm(total=sum(len(chunks[i]) for i in todo), desc="Converting", unit="img")
    if num_workers <= 1 or len(todo) <= 1:
        for i in todo:
            _convert_chunk(chunks[i], task, skip_invalid, paths[i])
            bar.update(len(chunks[i]))
    else:
        ctx = multiprocessing.get_context("spawn")  # fork is unsafe once JAX/threads are running
        with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=ctx) as pool:
            futures = {
                pool.submit(_convert_chunk, chunks[i], task, skip_invalid, paths[i]): i
                for i in todo
            }
            for future in concurrent.futures.as_completed(futures):
                future.result()
                bar.update(len(chunks[futures[future]]))
    bar.close()
    return list(zip(chunks, paths, strict=True))


def convert_all(
    pairs: Sequence[Pair], task: ConvertTask, cache_dir: Path, **options: Any
) -> Iterator[dict]:
    """Converts `pairs` (reusing cached chunks; `options` as `fill_cache`'s), then yields the
    examples in order."""
    skip_invalid = options.get("skip_invalid", False)
    cached = fill_cache(pairs, task, cache_dir, **options)
    skipped = 0
    for chunk, path in cached:
        data = _read_chunk(path)
        if data is None:  # spoilt since it was written (or planted): convert it again
            log.warning("cached chunk %s is unreadable; converting it again", path)
            _convert_chunk(chunk, task, skip_invalid, path)
            data = _read_chunk(path)
        for reason in data["skipped"]:
            log.warning("skipped: %s", reason)
        skipped += len(data["skipped"])
        yield from data["examples"]
    if skipped:
        log.warning("Skipped %d invalid files of %d", skipped, len(pairs))
