"""Damaged weight files name their path; written ones get the permissions the umask gives."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import safetensors.numpy

from recyclelora_jax import build
from recyclelora_jax.config import base_config, smoke
from recyclelora_jax.convert import load_dinov2, save_converted
from recyclelora_jax.export import load_export
from recyclelora_jax.model_io import save_tree


@pytest.mark.parametrize(
    "damage",
    [lambda d: d[: len(d) // 2], lambda d: b"\xff" * 8 + d[8:], lambda d: b""],
    ids=["truncated", "header_length", "empty"],
)
def test_damaged_safetensors_name_the_path(tmp_path, damage):
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file({"w": np.arange(100, dtype=np.float32)}, str(path))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match="not a readable safetensors file") as info:
        load_dinov2(path)
    assert str(info.value).startswith(f"{path}: ")


@pytest.fixture
def umask():
    def set_umask(mask: int) -> None:
        os.umask(mask)

    previous = os.umask(0o022)
    yield set_umask
    os.umask(previous)


@pytest.fixture(scope="module")
def base():
    """The smoke config's random frozen base, built once for the three umasks."""
    return build.load_backbone_weights(smoke(base_config()), 0)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask, mask, base):
    """Converted bases, exports and adapter trees: not the safetensors writer's owner-only 0600."""
    umask(mask)
    model, params = base
    save_converted(tmp_path / "converted.safetensors", model, params)
    save_tree(tmp_path / "tree.safetensors", {"a": {"b": np.ones(3, np.float32)}})
    for name in ("converted.safetensors", "tree.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "converted.safetensors",
        "tree.safetensors",
    ]


def test_damaged_export_names_the_path(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(ValueError, match=f"{path}: not a readable safetensors file"):
        load_export(path)
