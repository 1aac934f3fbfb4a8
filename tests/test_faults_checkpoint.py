"""Checkpoints damaged on disk: every restore verifies the checksums written at save time, names
the step and the file, falls back to the newest intact checkpoint, and never returns damaged state.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from recyclelora_jax.train.checkpoint import (
    CheckpointCorruptError,
    Checkpointer,
    CheckpointMismatchError,
    abstract_like,
)


def _trees(step: int) -> tuple[dict, dict]:
    mesh = jax.make_mesh((jax.device_count(),), ("fsdp",))
    split = NamedSharding(mesh, PartitionSpec("fsdp"))
    trainable = {
        "head": {"kernel": jax.device_put(jnp.arange(64.0).reshape(8, 8) + step, split)},
        "lora": {"a": jnp.full((3, 5), step, jnp.bfloat16), "b": jnp.arange(7) * step},
    }
    opt_state = {"mu": jax.tree.map(lambda x: x * 2, trainable), "count": jnp.int32(step)}
    return trainable, opt_state


def _save(ckpt: Checkpointer, step: int) -> None:
    trainable, opt_state = _trees(step)
    ckpt.save(
        step,
        trainable=trainable,
        opt_state=opt_state,
        data_iter={"state": f"iterator at {step}"},
        meta={"config": {"lr": 0.1 * step}, "base_weights": "base.safetensors"},
    )


@pytest.fixture
def two_checkpoints(tmp_path) -> Path:
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=True)
    _save(ckpt, 1)
    _save(ckpt, 2)
    ckpt.wait()
    ckpt.close()
    return tmp_path / "checkpoints"


def _restore(directory: Path, step: int | None = None, opt: bool = True):
    trainable, opt_state = _trees(0)
    ckpt = Checkpointer(directory, async_save=False)
    try:
        return ckpt.restore(
            abstract_like(trainable), abstract_like(opt_state) if opt else None, step=step
        )
    finally:
        ckpt.close()


def _assert_is_step(restored, step: int) -> None:
    trainable, opt_state = _trees(step)
    assert restored.step == step
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.trainable), trainable)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.opt_state), opt_state)
    assert restored.data_iter == {"state": f"iterator at {step}"}


def _largest_data_file(item_dir: Path) -> Path:
    return max((p for p in item_dir.rglob("d/*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_intact_checkpoints_restore_exactly(two_checkpoints):
    _assert_is_step(_restore(two_checkpoints), 2)
    _assert_is_step(_restore(two_checkpoints, step=1), 1)


@pytest.mark.parametrize("item", ["trainable", "opt_state", "state"])
def test_readable_but_changed_arrays_fall_back_with_a_warning(two_checkpoints, item, caplog):
    """Step 2's item replaced by step 1's files: every file decodes, the content is wrong."""
    shutil.rmtree(two_checkpoints / "2" / item)
    shutil.copytree(two_checkpoints / "1" / item, two_checkpoints / "2" / item)
    with pytest.raises(CheckpointCorruptError, match=rf"step 2 is damaged: .*2 {item}/"):
        _restore(two_checkpoints, step=2)
    with caplog.at_level(logging.WARNING):
        restored = _restore(two_checkpoints)
    _assert_is_step(restored, 1)
    assert f"step 2 is damaged: {two_checkpoints / '2'} {item}/" in caplog.text


def test_flipped_bytes_in_an_array_file_are_caught(two_checkpoints):
    path = _largest_data_file(two_checkpoints / "2" / "trainable")
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data), 97):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match="step 2 is damaged"):
        _restore(two_checkpoints, step=2, opt=False)
    _assert_is_step(_restore(two_checkpoints), 1)


def test_truncated_array_file_is_named(two_checkpoints):
    path = _largest_data_file(two_checkpoints / "2" / "opt_state")
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(CheckpointCorruptError, match=r"step 2 is damaged: cannot read .*opt_state"):
        _restore(two_checkpoints, step=2)


@pytest.mark.parametrize(
    ("item", "damage"),
    [
        ("meta", lambda text: text[: len(text) // 2]),  # undecodable JSON
        ("meta", lambda text: text.replace("base.safetensors", "other.safetensors")),  # valid JSON
        ("data_iter", lambda text: text.replace("at 2", "at 9")),
        ("integrity", lambda text: text[:-3]),
    ],
)
def test_damaged_json_items_name_file_and_step(two_checkpoints, item, damage, caplog):
    path = two_checkpoints / "2" / item / "metadata"
    path.write_text(damage(path.read_text()))
    with pytest.raises(CheckpointCorruptError, match=rf"step 2 is damaged: .*{item}/metadata"):
        _restore(two_checkpoints, step=2)
    with caplog.at_level(logging.WARNING):
        _assert_is_step(_restore(two_checkpoints), 1)
    assert "step 2 is damaged" in caplog.text
    ckpt = Checkpointer(two_checkpoints, async_save=False)
    meta_intact = item == "data_iter"  # reading the meta alone needs only meta and checksums
    assert ckpt.read_meta()["config"] == {"lr": 0.2 if meta_intact else 0.1}
    ckpt.close()


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(two_checkpoints):
    for step in ("1", "2"):
        (two_checkpoints / step / "meta" / "metadata").write_text("{")
    with pytest.raises(CheckpointCorruptError, match=r"no intact checkpoint in .*step 1 is dam"):
        _restore(two_checkpoints)


def test_training_saves_over_a_damaged_step_after_falling_back(two_checkpoints):
    (two_checkpoints / "2" / "meta" / "metadata").write_text("{")
    ckpt = Checkpointer(two_checkpoints, async_save=False)
    trainable, opt_state = _trees(0)
    assert ckpt.restore(abstract_like(trainable), abstract_like(opt_state)).step == 1
    _save(ckpt, 2)  # the resumed run reaches step 2 again
    ckpt.close()
    assert (two_checkpoints / "2.damaged" / "meta" / "metadata").read_text() == "{"
    _assert_is_step(_restore(two_checkpoints), 2)


def test_checkpoint_without_checksums_restores_with_a_warning(two_checkpoints, caplog):
    """Checkpoints written before the checksums existed still restore, flagged as unverified."""
    shutil.rmtree(two_checkpoints / "2" / "integrity")
    with caplog.at_level(logging.WARNING):
        _assert_is_step(_restore(two_checkpoints), 2)
    assert "has no checksums" in caplog.text


def test_a_model_mismatch_is_not_mistaken_for_damage(two_checkpoints):
    trainable, _ = _trees(0)
    trainable["lora"]["a"] = jnp.zeros((4, 5), jnp.bfloat16)
    ckpt = Checkpointer(two_checkpoints, async_save=False)
    with pytest.raises(CheckpointMismatchError, match=r"lora/a: checkpoint shape \(3, 5\)"):
        ckpt.restore(abstract_like(trainable))
    ckpt.close()
    assert sorted(p.name for p in two_checkpoints.iterdir()) == ["1", "2"]
