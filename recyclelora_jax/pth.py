"""Read PyTorch ``torch.save`` state dicts (zip format) into numpy without importing torch.

A ``.pth`` file is a zip holding ``<root>/data.pkl`` (a pickle whose tensors point, through
persistent ids, at raw storages ``<root>/data/<key>``). Unpickling it with the standard
``pickle`` machinery would run any callable the file names; this reader allows only the handful
of globals a state dict of tensors needs and rebuilds each tensor as a numpy view of its storage,
so pretrained checkpoints load on machines without torch and without trusting the file.
"""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

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


class _StorageType:
    """Stands in for ``torch.<X>Storage`` inside the pickle: only its dtype matters."""

    def __init__(self, dtype: Any):
        self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage, offset, size, stride, *_unused) -> np.ndarray:
    """numpy counterpart of ``torch._utils._rebuild_tensor_v2`` (copies, so views are safe)."""
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride):
        raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} differ in rank")
    if 0 not in size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if offset < 0 or min(stride, default=0) < 0 or last >= storage.size:
            raise pickle.UnpicklingError(
                f"tensor (offset {offset}, size {size}, stride {stride}) overruns its storage "
                f"of {storage.size} elements"
            )
    base = storage[offset:] if storage.size else storage
    view = np.lib.stride_tricks.as_strided(
        base, size, [s * storage.itemsize for s in stride], writeable=False
    )
    return np.array(view)


def _rebuild_parameter(data, *_unused) -> np.ndarray:
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(dt) for name, dt in _STORAGE_DTYPES.items()},
}


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, root: str, byteorder: str, path: Path):
        super().__init__(file)
        self._archive, self._root, self._path = archive, root, path
        self._byteorder = "<" if byteorder == "little" else ">"
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[module, name]
        except KeyError:
            raise pickle.UnpicklingError(
                f"{self._path}: refusing to load {module}.{name}; only state dicts of tensors "
                "are read without torch"
            ) from None

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"{self._path}: unknown persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"{self._path}: storage {key} has no known dtype")
        if key not in self._storages:
            raw = self._archive.read(f"{self._root}/data/{key}")
            dtype = storage_type.dtype.newbyteorder(self._byteorder)
            array = np.frombuffer(raw, dtype=dtype)
            if array.size != numel:
                raise pickle.UnpicklingError(
                    f"{self._path}: storage {key} holds {array.size} elements, pickle says {numel}"
                )
            self._storages[key] = array.astype(storage_type.dtype, copy=False)
        return self._storages[key]


def read_pth(path: str | Path) -> dict[str, np.ndarray]:
    """The ``{name: array}`` state dict saved by ``torch.save`` at ``path`` (zip format)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path}: not a zip-format torch checkpoint (torch >= 1.6 writes zip); re-save it "
            "with a current torch or convert it there with `torch.load` + safetensors"
        )
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path}: expected one */data.pkl in the archive, found {pickles}")
        root = pickles[0][: -len("/data.pkl")]
        names = set(archive.namelist())
        byteorder = "little"
        if f"{root}/byteorder" in names:
            byteorder = archive.read(f"{root}/byteorder").decode().strip()
        with archive.open(pickles[0]) as f:
            state = _StateDictUnpickler(f, archive, root, byteorder, path).load()
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise ValueError(f"{path}: expected a flat state dict of tensors, got {type(state)}")
    return dict(state)
