"""Parameter trees as safetensors files with string metadata: how the project's own files
(converted backbones, merged exports, adapter trees) are written and read.

Keys are the '/'-joined tree paths (``backbone/blocks_0/attn/qkv/kernel``); a ``format`` entry in
the metadata says what the file holds. The bytes go through `safetensors_file`, so a written file
appears whole and an unreadable one is named.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from recyclelora_jax import safetensors_file

Params = dict[str, Any]


def save_tree(path: str | os.PathLike, tree: Params, meta: Mapping[str, str] | None = None) -> None:
    """Write ``tree`` (arrays on any device) and ``meta`` to ``path``."""
    flat = traverse_util.flatten_dict(jax.device_get(tree), sep="/")
    # safetensors writes an array's buffer as it lies: a transposed view must be made contiguous.
    arrays = {k: np.ascontiguousarray(v) for k, v in flat.items()}
    safetensors_file.save(path, arrays, dict(meta or {}))


def read_meta(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a tree file, without reading its tensors."""
    return safetensors_file.metadata(_existing(path))


def load_tree(path: str | os.PathLike, fmt: str | None = None) -> tuple[Params, dict[str, str]]:
    """``(tree, meta)`` of a file written by ``save_tree``; with ``fmt``, the file's ``format``
    metadata must be that."""
    meta = read_meta(path)
    if fmt is not None and meta.get("format") != fmt:
        raise ValueError(f"{path} is not a {fmt} file (format {meta.get('format')!r})")
    arrays, _ = safetensors_file.load(path)
    return traverse_util.unflatten_dict(arrays, sep="/"), meta


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    return path
