"""Read PyTorch ``torch.save`` state dicts (zip format) into numpy without importing torch.

A ``.pth`` file is a zip holding ``<root>/data.pkl`` (a pickle whose tensors point, through
persistent ids, at raw storages ``<root>/data/<key>``). Unpickling it with the standard
``pickle`` machinery would run any callable the file names; this reader allows only the handful
of globals a state dict of tensors needs and rebuilds each tensor as a numpy view of its storage,
so pretrained checkpoints load on machines without torch and without trusting the file.

Nothing is allocated beyond what the file holds: each tensor materialises at most the elements of
its storage (a stride-0 or overlapping view that would expand a tiny file is refused), all tensors
together at most `MAX_EXPANSION` times the file's bytes (shared storages), and each archive entry
at most the file's size. Every failure is a `PthError` naming the file.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

MAX_EXPANSION = 2  # materialised bytes per byte of file: room for a tensor saved beside its view

# torch's legacy typed-storage class names, which the pickle uses to name a storage's dtype.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class PthError(ValueError):
    """A ``.pth`` file that is not a readable, bounded state dict of tensors."""


class _StorageType:
    """Stands in for ``torch.<X>Storage`` inside the pickle: only its dtype matters."""

    def __init__(self, dtype: Any):
        self.dtype = np.dtype(dtype)


def _rebuild_parameter(data, *_unused) -> np.ndarray:
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(dt) for name, dt in _STORAGE_DTYPES.items()},
}


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, root: str, byteorder: str, budget: int):
        super().__init__(file)
        self._archive, self._root = archive, root
        self._byteorder = "<" if byteorder == "little" else ">"
        self._storages: dict[str, np.ndarray] = {}
        self._budget = budget  # bytes the tensors may still materialise

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild_tensor
        try:
            return _ALLOWED[module, name]
        except KeyError:
            raise PthError(
                f"refusing to load {module}.{name}; only state dicts of tensors are read "
                "without torch"
            ) from None

    def _rebuild_tensor(self, storage, offset, size, stride, *_unused) -> np.ndarray:
        """numpy counterpart of ``torch._utils._rebuild_tensor_v2``: checked against its storage
        and the file's budget, then copied (so views are safe)."""
        size, stride = tuple(size), tuple(stride)
        if len(size) != len(stride):
            raise PthError(f"tensor size {size} and stride {stride} differ in rank")
        numel = math.prod(size)
        if numel:
            last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
            if offset < 0 or min(stride, default=0) < 0 or last >= storage.size:
                raise PthError(
                    f"tensor (offset {offset}, size {size}, stride {stride}) overruns its "
                    f"storage of {storage.size} elements"
                )
            if numel > storage.size - offset:
                raise PthError(
                    f"tensor of size {size} (stride {stride}) would materialise {numel} "
                    f"elements from a storage of {storage.size}: stride-0 or overlapping views "
                    "are refused"
                )
        self._budget -= numel * storage.itemsize
        if self._budget < 0:
            raise PthError(
                f"its tensors would materialise more than {MAX_EXPANSION}x the file's bytes "
                f"(refused at a tensor of size {size}, before allocating it)"
            )
        base = storage[offset:] if storage.size else storage
        view = np.lib.stride_tricks.as_strided(
            base, size, [s * storage.itemsize for s in stride], writeable=False
        )
        return np.array(view)

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise PthError(f"unknown persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise PthError(f"storage {key} has no known dtype")
        if key not in self._storages:
            raw = _read_entry(self._archive, f"{self._root}/data/{key}")
            dtype = storage_type.dtype.newbyteorder(self._byteorder)
            array = np.frombuffer(raw, dtype=dtype)
            if array.size != numel:
                raise PthError(f"storage {key} holds {array.size} elements, pickle says {numel}")
            self._storages[key] = array.astype(storage_type.dtype, copy=False)
        return self._storages[key]


def _read_entry(archive: zipfile.ZipFile, name: str) -> bytes:
    """An archive entry, refused if it would inflate past the archive's own size."""
    info = archive.getinfo(name)
    if info.file_size > os.fstat(archive.fp.fileno()).st_size:
        raise PthError(f"entry {name} inflates to {info.file_size} bytes, more than the file")
    return archive.read(info)


def read_pth(path: str | Path) -> dict[str, np.ndarray]:
    """The ``{name: array}`` state dict saved by ``torch.save`` at ``path`` (zip format)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise PthError(
            f"{path}: not a zip-format torch checkpoint (torch >= 1.6 writes zip); re-save it "
            "with a current torch or convert it there with `torch.load` + safetensors"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise PthError(f"expected one */data.pkl in the archive, found {pickles}")
            root = pickles[0][: -len("/data.pkl")]
            byteorder = "little"
            if f"{root}/byteorder" in archive.namelist():
                byteorder = _read_entry(archive, f"{root}/byteorder").decode().strip()
            budget = MAX_EXPANSION * path.stat().st_size
            data = io.BytesIO(_read_entry(archive, pickles[0]))
            state = _StateDictUnpickler(data, archive, root, byteorder, budget).load()
    except (PthError, pickle.UnpicklingError, zipfile.BadZipFile, KeyError, EOFError) as err:
        raise PthError(f"{path}: {err}") from err
    except (ValueError, TypeError, AttributeError, IndexError) as err:  # malformed pickle data
        raise PthError(
            f"{path}: not a state dict of tensors ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise PthError(f"{path}: expected a flat state dict of tensors, got {type(state)}")
    return dict(state)
