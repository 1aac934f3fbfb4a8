"""Every safetensors file the package reads or writes goes through here: errors name the file,
and a written file appears whole (temporary name, then rename) with the permissions the user's
umask gives (the safetensors writer itself creates files readable by their owner only)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy


def save(path: str | os.PathLike, arrays: dict[str, np.ndarray], metadata: dict | None = None):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        safetensors.numpy.save_file(arrays, str(tmp), metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata alone (no tensor is read); a `ValueError` naming ``path`` when unreadable."""
    try:
        with safetensors.safe_open(str(path), framework="numpy") as f:
            return f.metadata() or {}
    except (safetensors.SafetensorError, OSError) as err:
        raise _unreadable(path, err) from err


def load(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(arrays, metadata)`` of ``path``; a `ValueError` naming it when unreadable."""
    meta = metadata(path)
    try:
        return safetensors.numpy.load_file(str(path)), meta
    except (safetensors.SafetensorError, OSError) as err:
        raise _unreadable(path, err) from err


def _unreadable(path: str | os.PathLike, err: Exception) -> ValueError:
    return ValueError(f"{path}: not a readable safetensors file ({err})")
