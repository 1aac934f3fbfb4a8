"""Read and write PyTorch ``torch.save`` files (zip format) as numpy without importing torch.

A ``.pth`` file is a zip holding ``<root>/data.pkl`` (a pickle whose tensors point, through
persistent ids, at raw storages ``<root>/data/<key>``). Unpickling it with the standard
``pickle`` machinery would run any callable the file names; this reader allows only the handful
of globals a state dict of tensors needs and rebuilds each tensor as a numpy view of its storage,
so pretrained checkpoints load on machines without torch and without trusting the file. Other
classes (an mmengine checkpoint's message hub, its optimizer state) can be read as inert
:class:`Opaque` stand-ins. The writer emits only what ``torch.load(weights_only=True)`` accepts.

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
import struct
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


class Opaque:
    """Stand-in for an object of a class the reader does not load: nothing of it is called or
    kept but its name (``module.qualname`` in ``_name``)."""

    _name = "?"

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<not loaded: {self._name}>"


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(
        self,
        file,
        archive: zipfile.ZipFile,
        root: str,
        byteorder: str,
        budget: int,
        opaque: bool = False,
    ):
        super().__init__(file)
        self._archive, self._root, self._opaque = archive, root, opaque
        self._byteorder = "<" if byteorder == "little" else ">"
        self._storages: dict[str, np.ndarray] = {}
        self._budget = budget  # bytes the tensors may still materialise

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild_tensor
        try:
            return _ALLOWED[module, name]
        except KeyError:
            if self._opaque:
                return type(name, (Opaque,), {"_name": f"{module}.{name}"})
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


def load_pth(path: str | Path, *, opaque: bool = False) -> Any:
    """The object saved by ``torch.save`` at ``path`` (zip format), tensors as numpy arrays.
    ``opaque``: objects of other classes become :class:`Opaque` instead of an error."""
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
            return _StateDictUnpickler(data, archive, root, byteorder, budget, opaque).load()
    except (PthError, pickle.UnpicklingError, zipfile.BadZipFile, KeyError, EOFError) as err:
        raise PthError(f"{path}: {err}") from err
    except (ValueError, TypeError, AttributeError, IndexError) as err:  # malformed pickle data
        raise PthError(
            f"{path}: not a state dict of tensors ({type(err).__name__}: {err})"
        ) from err


def read_pth(path: str | Path) -> dict[str, np.ndarray]:
    """The ``{name: array}`` state dict saved by ``torch.save`` at ``path`` (zip format)."""
    state = load_pth(path)
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise PthError(f"{path}: expected a flat state dict of tensors, got {type(state)}")
    return dict(state)


# ----------------------------------------------------------------------------------------------
# Writing: the pickle opcodes of protocol 2, emitted directly (no torch classes are needed).

_STORAGE_NAMES = {np.dtype(dt): name for name, dt in _STORAGE_DTYPES.items()}


class _PickleWriter:
    """Emits dicts (``OrderedDict`` too), lists, tuples, str, int, float, bool, None and numpy
    arrays (as CPU tensors, one storage each) -- the subset ``weights_only`` loading accepts."""

    def __init__(self):
        self.out = io.BytesIO()
        self.storages: list[np.ndarray] = []

    def emit(self, obj: Any) -> None:
        w = self.out.write
        if obj is None:
            w(pickle.NONE)
        elif isinstance(obj, bool):
            w(pickle.NEWTRUE if obj else pickle.NEWFALSE)
        elif isinstance(obj, int):
            if -(2**31) <= obj < 2**31:
                w(pickle.BININT + struct.pack("<i", obj))
            else:
                data = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
                w(pickle.LONG1 + bytes([len(data)]) + data)
        elif isinstance(obj, float):
            w(pickle.BINFLOAT + struct.pack(">d", obj))
        elif isinstance(obj, str):
            data = obj.encode("utf-8")
            w(pickle.BINUNICODE + struct.pack("<I", len(data)) + data)
        elif isinstance(obj, tuple):
            w(pickle.MARK)
            for x in obj:
                self.emit(x)
            w(pickle.TUPLE)
        elif isinstance(obj, list):
            w(pickle.EMPTY_LIST + pickle.MARK)
            for x in obj:
                self.emit(x)
            w(pickle.APPENDS)
        elif isinstance(obj, OrderedDict):
            self._global("collections", "OrderedDict")
            w(pickle.EMPTY_TUPLE + pickle.REDUCE)
            self._items(obj)
        elif isinstance(obj, dict):
            w(pickle.EMPTY_DICT)
            self._items(obj)
        elif isinstance(obj, np.ndarray):
            self._tensor(obj)
        else:
            raise TypeError(f"cannot write a {type(obj).__name__} into a .pth file")

    def _global(self, module: str, name: str) -> None:
        self.out.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())

    def _items(self, mapping: dict) -> None:
        self.out.write(pickle.MARK)
        for k, v in mapping.items():
            self.emit(k)
            self.emit(v)
        self.out.write(pickle.SETITEMS)

    def _tensor(self, array: np.ndarray) -> None:
        if array.dtype not in _STORAGE_NAMES:
            raise TypeError(f"no torch storage type for dtype {array.dtype}")
        array = np.asarray(array, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        key = str(len(self.storages))
        self.storages.append(array)
        self._global("torch._utils", "_rebuild_tensor_v2")
        self.out.write(pickle.MARK + pickle.MARK)
        self.emit("storage")
        self._global("torch", _STORAGE_NAMES[array.dtype])
        for x in (key, "cpu", int(array.size)):
            self.emit(x)
        self.out.write(pickle.TUPLE + pickle.BINPERSID)
        strides = tuple(s // array.itemsize for s in array.strides)
        for x in (0, tuple(array.shape), strides, False, OrderedDict()):
            self.emit(x)
        self.out.write(pickle.TUPLE + pickle.REDUCE)


def write_pth(path: str | Path, obj: Any) -> None:
    """Write ``obj`` (see :class:`_PickleWriter` for what it may hold) as ``torch.save`` would,
    little-endian, stored uncompressed; written to a temporary name, then renamed (a failed
    write leaves nothing)."""
    path = Path(path)
    writer = _PickleWriter()
    writer.out.write(pickle.PROTO + b"\x02")
    writer.emit(obj)
    writer.out.write(pickle.STOP)
    root = path.stem or "archive"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr(f"{root}/data.pkl", writer.out.getvalue())
            archive.writestr(f"{root}/byteorder", "little")
            for key, array in enumerate(writer.storages):
                data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
                archive.writestr(f"{root}/data/{key}", data)
            archive.writestr(f"{root}/version", "3\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
