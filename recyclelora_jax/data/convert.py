"""Turns (image file, label file) pairs into stored examples: validated, mapped, PNG-encoded.

The work is split into chunks converted in parallel; each finished chunk is written atomically to
a cache folder, so an interrupted `prepare` resumes where it stopped instead of redoing it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import logging
import multiprocessing
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import tqdm

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
    halve: bool = False  # Mapillary evaluation protocol: image bicubic, label nearest, ×0.5


def halve(image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Half resolution (sizes rounded like mmcv `rescale`): image bicubic, label nearest."""
    h, w = label.shape
    size = (int(w * 0.5 + 0.5), int(h * 0.5 + 0.5))
    image = cv2.resize(image, size, interpolation=cv2.INTER_CUBIC)
    return image, cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)


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
    """Converts a chunk into the pickle `out` (written atomically); returns the number skipped."""
    examples, skipped = [], []
    for pair in pairs:
        try:
            examples.append(convert_pair(pair, task))
        except (ValueError, OSError) as err:
            if not skip_invalid:
                raise ValueError(f"{err} (use --skip_invalid to skip bad files)") from err
            skipped.append(str(err))
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    tmp.write_bytes(pickle.dumps({"examples": examples, "skipped": skipped}))
    os.replace(tmp, out)
    return len(skipped)


def _chunk_key(pairs: Sequence[Pair], task: ConvertTask) -> str:
    """Names a chunk by its inputs (paths, sizes, mtimes) and options: stale caches go unused."""
    h = hashlib.sha1(repr((task.table.name, task.table.lut.tobytes(), task.halve)).encode())
    for p in pairs:
        for f in (p.image, p.label):
            st = f.stat()
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def convert_all(
    pairs: Sequence[Pair],
    task: ConvertTask,
    cache_dir: Path,
    *,
    num_workers: int = 1,
    skip_invalid: bool = False,
    chunk_size: int | None = None,
) -> Iterator[dict]:
    """Converts `pairs` (reusing cached chunks), then yields the examples in order."""
    chunk_size = chunk_size or CHUNK_SIZE
    cache_dir.mkdir(parents=True, exist_ok=True)
    chunks = [pairs[i : i + chunk_size] for i in range(0, len(pairs), chunk_size)]
    paths = [cache_dir / f"chunk{i:06d}-{_chunk_key(c, task)}.pkl" for i, c in enumerate(chunks)]
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
    skipped = 0
    for path in paths:
        data = pickle.loads(path.read_bytes())
        for reason in data["skipped"]:
            log.warning("skipped: %s", reason)
        skipped += len(data["skipped"])
        yield from data["examples"]
    if skipped:
        log.warning("Skipped %d invalid files of %d", skipped, len(pairs))
