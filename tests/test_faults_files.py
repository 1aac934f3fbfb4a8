"""Damaged weight files name their path."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.numpy

from recyclelora_jax.convert import load_dinov2


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
