"""Checkpointer on a small tree: keep-last-k and the messages that name what does not fit."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from recyclelora_jax import export
from recyclelora_jax.train import checkpoint
from recyclelora_jax.train.checkpoint import Checkpointer, CheckpointMismatchError, abstract_like

TREE = {"a": {"kernel": jnp.arange(6.0).reshape(2, 3)}, "b": jnp.ones(4)}


def _save(ckpt: Checkpointer, step: int, tree=TREE) -> None:
    ckpt.save(
        step,
        trainable=tree,
        opt_state={"mu": tree},
        data_iter={"state": "{}"},
        meta={"step": step},
    )


def test_keeps_the_last_k_and_restores_the_latest(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2, async_save=False)
    for step in range(1, 6):
        _save(ckpt, step, jax.tree.map(lambda x, s=step: x * s, TREE))
    assert ckpt.manager.all_steps() == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["4", "5"]
    restored = ckpt.restore(abstract_like(TREE), abstract_like({"mu": TREE}))
    assert restored.step == 5 and ckpt.read_meta() == {"step": 5}
    np.testing.assert_array_equal(restored.trainable["b"], 5 * np.ones(4))
    np.testing.assert_array_equal(restored.opt_state["mu"]["a"]["kernel"], 5 * TREE["a"]["kernel"])
    older = ckpt.restore(abstract_like(TREE), step=4)
    np.testing.assert_array_equal(older.trainable["b"], 4 * np.ones(4))
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 3"):
        ckpt.restore(abstract_like(TREE), step=3)
    ckpt.close()


def test_mismatches_name_every_missing_unexpected_and_reshaped_leaf(tmp_path):
    ckpt = Checkpointer(tmp_path, async_save=False)
    _save(ckpt, 1)
    model = {"a": {"kernel": jnp.zeros((3, 3))}, "c": jnp.zeros(2)}  # no b, a new c, a reshaped
    with pytest.raises(CheckpointMismatchError) as err:
        ckpt.restore(abstract_like(model))
    message = str(err.value)
    assert "checkpoint item 'trainable'" in message
    assert "missing c" in message and "unexpected b" in message
    assert "a/kernel: checkpoint shape (2, 3) != model shape (3, 3)" in message
    with pytest.raises(CheckpointMismatchError, match=r"item 'opt_state'.*missing mu/c"):
        ckpt.restore(abstract_like(TREE), abstract_like({"mu": {**TREE, "c": jnp.zeros(2)}}))
    ckpt.close()


def test_a_checkpoint_with_the_former_rng_entry_restores(tmp_path):
    """Checkpoints written before the unused ``rng`` was dropped (b4de529) hold it beside the
    step in their ``state`` item, checksummed: they restore, the entry ignored."""
    old_state = {"step": np.asarray(3, np.int64), "rng": np.asarray([0, 7], np.uint32)}
    arrays = {checkpoint.TRAINABLE: TREE, checkpoint.OPT_STATE: {"mu": TREE}}
    arrays[checkpoint.STATE] = old_state
    items = {checkpoint.DATA: {"state": "{}"}, checkpoint.META: {"step": 3}}
    integrity = {name: checkpoint.array_checksums(tree) for name, tree in arrays.items()}
    integrity |= {name: checkpoint.json_checksum(value) for name, value in items.items()}
    items[checkpoint.INTEGRITY] = integrity
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.manager.save(  # the layout Checkpointer.save wrote then
        3,
        args=ocp.args.Composite(
            **{name: ocp.args.StandardSave(tree) for name, tree in arrays.items()},
            **{name: ocp.args.JsonSave(value) for name, value in items.items()},
        ),
    )
    restored = ckpt.restore(abstract_like(TREE), abstract_like({"mu": TREE}))
    assert (restored.step, restored.meta, restored.data_iter) == (3, {"step": 3}, {"state": "{}"})
    np.testing.assert_array_equal(restored.opt_state["mu"]["b"], TREE["b"])
    ckpt.close()


def test_a_checkpoint_from_before_the_recipe_tables_is_refused_by_name(tmp_path):
    """Configs stored before f945239 have a ``peft`` section and no recipe tables: restoring
    such a run names the break and the way out instead of failing on a missing key."""
    old_config = {"seed": 0, "peft": {"method": "recyclelora", "r_main": 32, "r_sub": 4}}
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    ckpt.save(2, trainable=TREE, opt_state={"mu": TREE}, data_iter={}, meta={"config": old_config})
    ckpt.close()
    with pytest.raises(
        ValueError,
        match=r"checkpoints was written before the recipe tables.*"
        r"git checkout f945239~1",
    ):
        export.restore_run(tmp_path)
