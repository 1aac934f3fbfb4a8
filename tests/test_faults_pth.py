"""Hostile and damaged ``.pth`` files: refused with a `PthError` naming the file, before anything
beyond the bytes the file holds is allocated."""

from __future__ import annotations

import io
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch

from recyclelora_jax.pth import PthError, read_pth

LIMIT = 4 << 20  # no test file here is above 1 MB: a 4 MB peak means something expanded


def _read_with_peak(path) -> tuple[Exception | None, int]:
    tracemalloc.start()
    try:
        read_pth(path)
        error = None
    except PthError as err:
        error = err
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return error, peak


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.zeros(1).expand(100_000, 100_000),  # stride 0: 37 GiB from 4 bytes
        lambda: torch.zeros(20_000).as_strided((10_000, 10_000), (1, 1)),  # overlapping rows
    ],
    ids=["stride0", "overlapping"],
)
def test_expanding_views_are_refused_before_allocation(tmp_path, make):
    path = tmp_path / "bomb.pth"
    torch.save({"w": make()}, path)
    assert path.stat().st_size < 100_000
    error, peak = _read_with_peak(path)
    assert error is not None and str(error).startswith(f"{path}: tensor of size")
    assert "stride-0 or overlapping views are refused" in str(error)
    assert peak < LIMIT


def test_many_views_of_one_storage_are_bounded_by_the_file(tmp_path):
    """Each view fits its storage, together they would expand the file ~100x."""
    base = torch.zeros(40_000)
    path = tmp_path / "views.pth"
    torch.save({f"v{i}": base[i * 100 :] for i in range(200)}, path)
    error, peak = _read_with_peak(path)
    assert error is not None and "would materialise more than 2x the file's bytes" in str(error)
    assert str(error).startswith(str(path))
    assert peak < LIMIT + path.stat().st_size * 3


def test_a_tensor_and_its_transpose_still_load(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    torch.save({"w": base, "wt": base.t()}, tmp_path / "tied.pth")
    got = read_pth(tmp_path / "tied.pth")
    np.testing.assert_array_equal(got["wt"], base.t().numpy())


def test_zip_bomb_entry_is_refused_before_inflating(tmp_path):
    path = tmp_path / "zipbomb.pth"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\0" * (64 << 20))  # 64 MB inflating from ~64 KB
    error, peak = _read_with_peak(path)
    assert error is not None and "archive/data.pkl inflates to 67108864 bytes" in str(error)
    assert str(error).startswith(str(path))
    assert peak < LIMIT


def _saved(tmp_path) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(1000.0)}, buf)
    return buf.getvalue()


def _damage_crc(data: bytes) -> bytes:
    """Flip a byte inside the storage entry (its CRC no longer matches)."""
    start = data.index(np.arange(1000.0, dtype=np.float32).tobytes()[:64])
    damaged = bytearray(data)
    damaged[start + 100] ^= 0xFF
    return bytes(damaged)


def _rewrite(data: bytes, edit) -> bytes:
    """The archive with each entry replaced by ``edit(name, body)`` (None drops it)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            body = edit(info.filename, src.read(info))
            if body is not None:
                dst.writestr(info, body)
    return out.getvalue()


def _drop_storage(data: bytes) -> bytes:
    return _rewrite(data, lambda name, body: None if "/data/" in name else body)


def _bad_pickle(data: bytes) -> bytes:
    return _rewrite(data, lambda name, body: body[: len(body) // 2] if ".pkl" in name else body)


def _global_call(data: bytes) -> bytes:
    """A pickle naming os.system: refused by name, never called."""
    hostile = b"cos\nsystem\n(S'touch pwned'\ntR."
    return _rewrite(data, lambda name, body: hostile if ".pkl" in name else body)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: d[: len(d) // 2], "not a zip-format torch checkpoint"),
        (_damage_crc, "Bad CRC-32"),
        (_drop_storage, "There is no item named"),
        (_bad_pickle, "pickle data was truncated"),
        (_global_call, "refusing to load os.system"),
    ],
    ids=["truncated", "crc", "missing_storage", "truncated_pickle", "global"],
)
def test_damaged_files_name_the_path(tmp_path, monkeypatch, damage, message):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "damaged.pth"
    path.write_bytes(damage(_saved(tmp_path)))
    with pytest.raises(PthError, match=message) as info:
        read_pth(path)
    assert str(info.value).startswith(f"{path}: ")
    assert not (tmp_path / "pwned").exists()
