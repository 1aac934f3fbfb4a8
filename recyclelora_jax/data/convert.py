"""Turns (image file, label file) pairs into stored examples: validated, mapped, PNG-encoded.

The work is split into chunks converted in parallel; each finished chunk is written atomically to
a cache folder, so an interrupted `prepare` resumes where it stopped instead of redoing it. A
chunk is plain arrays and JSON in an `.npz` read with `allow_pickle=False`: whoever can write into
a shared data folder can spoil a cached chunk (it is then converted again) but not run code.

Label values outside the dataset's table become ignore, as in the reference's conversion tools;
each chunk records them per file, and `convert_all` sums them into an `UnknownLabels` report.
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
    strict_labels: bool = False  # a value outside the table is an error (else ignore, counted)


@dataclasses.dataclass
class UnknownLabels:
    """Label values outside the table (mapped to ignore): pixels per value in each file."""

    table: str
    files: dict[str, dict[int, int]] = dataclasses.field(default_factory=dict)

    def values(self) -> dict[int, dict[str, int]]:
        """Each value found, ascending: ``{"pixels": total, "files": files holding it}``."""
        out: dict[int, dict[str, int]] = {}
        for counts in self.files.values():
            for value, pixels in counts.items():
                entry = out.setdefault(value, {"pixels": 0, "files": 0})
                entry["pixels"] += pixels
                entry["files"] += 1
        return dict(sorted(out.items()))

    def summary(self) -> str:
        values = self.values()
        if not values:
            return f"every label value is in the {self.table} table"
        listed = ", ".join(
            f"{v} ({e['pixels']} pixels in {_files(e['files'])})" for v, e in values.items()
        )
        return (
            f"label values outside the {self.table} table, mapped to ignore (255), in "
            f"{_files(len(self.files))}: {listed}"
        )

    def to_json(self) -> dict:
        return {
            "table": self.table,
            "values": {str(v): e for v, e in self.values().items()},
            "files": {f: {str(v): n for v, n in c.items()} for f, c in self.files.items()},
        }

    @classmethod
    def from_json(cls, record: dict) -> UnknownLabels:
        files = {f: {int(v): int(n) for v, n in c.items()} for f, c in record["files"].items()}
        return cls(record["table"], files)


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


def _files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def convert_pair(pair: Pair, task: ConvertTask) -> tuple[dict, dict[int, int]]:
    """Reads, validates and encodes one pair: (example, pixels per label value outside the
    table); raises `ValueError` naming the offending file."""
    image_bytes = pair.image.read_bytes()
    image = codecs.decode_image(image_bytes, str(pair.image))
    raw = task.read_label(pair.label.read_bytes(), str(pair.label))
    if raw.shape != image.shape[:2]:
        raise ValueError(
            f"{pair.label}: label size {raw.shape[::-1]} differs from image size "
            f"{image.shape[1::-1]} of {pair.image}"
        )
    label = task.table.map(raw, str(pair.label), strict=task.strict_labels)
    unknown = {} if task.strict_labels else task.table.unknown(raw)
    if task.halve:
        image, label = halve(image, label)
        image_bytes = codecs.encode_png(image)
    example = {"image": image_bytes, "label": codecs.encode_png(label), "file_name": pair.name}
    return example, unknown


def _convert_chunk(pairs: Sequence[Pair], task: ConvertTask, skip_invalid: bool, out: Path) -> int:
    """Converts a chunk into `out` (written atomically); returns the number skipped."""
    examples, skipped, unknown = [], [], {}
    for pair in pairs:
        try:
            example, values = convert_pair(pair, task)
        except (ValueError, OSError) as err:
            if not skip_invalid:
                raise ValueError(f"{err} (use --skip_invalid to skip bad files)") from err
            skipped.append(str(err))
            continue
        examples.append(example)
        if values:
            unknown[pair.name] = values
    _write_chunk(out, examples, skipped, unknown)
    return len(skipped)


def _write_chunk(
    out: Path, examples: list[dict], skipped: list[str], unknown: dict[str, dict[int, int]]
) -> None:
    """Encoded images and labels as two byte buffers with end offsets; names, skips and the
    unknown label values per file as JSON."""
    arrays = {}
    for key in ("image", "label"):
        blobs = [e[key] for e in examples]
        arrays[f"{key}_bytes"] = np.frombuffer(b"".join(blobs), np.uint8)
        arrays[f"{key}_ends"] = np.cumsum([len(b) for b in blobs], dtype=np.int64)
    info = {
        "file_names": [e["file_name"] for e in examples],
        "skipped": skipped,
        "unknown": {f: {str(v): n for v, n in c.items()} for f, c in unknown.items()},
    }
    text = json.dumps(info)
    arrays["json"] = np.frombuffer(text.encode(), np.uint8)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, out)


UNREADABLE = "is unreadable"
STALE = "predates the counting of unknown label values and skipped files"


def _read_chunk(path: Path) -> tuple[dict | None, str]:
    """``(chunk, "")`` of a chunk written by `_write_chunk`, or ``(None, why not)`` if it is
    missing, not one (it is never unpickled), or from before unknown label values were
    counted and skipped files: those may have been skipped for such values, which are now kept
    (one that skipped nothing had none, and is read)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            info = json.loads(z["json"].tobytes())
            names, skipped = info["file_names"], info["skipped"]
            if "unknown" not in info and skipped:
                return None, STALE
            unknown = {
                f: {int(v): int(n) for v, n in c.items()}
                for f, c in info.get("unknown", {}).items()
            }
            columns = {}
            for key in ("image", "label"):
                data, ends = z[f"{key}_bytes"].tobytes(), z[f"{key}_ends"].tolist()
                if len(ends) != len(names) or (ends and ends[-1] != len(data)):
                    return None, UNREADABLE
                columns[key] = [data[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile):
        return None, UNREADABLE
    examples = [
        {"image": i, "label": lab, "file_name": n}
        for i, lab, n in zip(columns["image"], columns["label"], names, strict=True)
    ]
    return {"examples": examples, "skipped": [str(r) for r in skipped], "unknown": unknown}, ""


def _chunk_key(pairs: Sequence[Pair], task: ConvertTask) -> str:
    """Names a chunk by its inputs (paths, sizes, mtimes) and options: stale caches go unused."""
    halving = task.halve and "official"  # the halving rule changed: caches of the old one unused
    options: tuple = (task.table.name, task.table.lut.tobytes(), halving)
    if task.strict_labels:  # the default keeps the key of chunks written before the option
        options += ("strict labels",)
    h = hashlib.sha1(repr(options).encode())
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
    pairs: Sequence[Pair],
    task: ConvertTask,
    cache_dir: Path,
    *,
    report: UnknownLabels | None = None,
    **options: Any,
) -> Iterator[dict]:
    """Converts `pairs` (reusing cached chunks; `options` as `fill_cache`'s), then yields the
    examples in order; label values outside the table are added to `report` and summarised
    in the log at the end."""
    skip_invalid = options.get("skip_invalid", False)
    report = report if report is not None else UnknownLabels(task.table.name)
    cached = fill_cache(pairs, task, cache_dir, **options)
    skipped = 0
    for chunk, path in cached:
        data, problem = _read_chunk(path)
        if data is None:  # spoilt or planted since it was written, or stale: convert it again
            log.warning("cached chunk %s %s; converting it again", path, problem)
            _convert_chunk(chunk, task, skip_invalid, path)
            data, _ = _read_chunk(path)
        for reason in data["skipped"]:
            log.warning("skipped: %s", reason)
        skipped += len(data["skipped"])
        report.files.update(data["unknown"])
        yield from data["examples"]
    if skipped:
        log.warning("Skipped %d invalid files of %d", skipped, len(pairs))
    if report.files:
        log.warning("%s", report.summary())
