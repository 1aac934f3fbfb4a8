"""Orbax checkpoints of what training changes: trainable params, optimizer state, step, RNG and
data-iterator state, plus a JSON `meta` item (full config, pointer to the frozen base weights).

Each item is separate (`ocp.args.Composite`), so restoring "adapters only" into a fresh base is
one item read, and a checkpoint is a plain pytree anyone can load without the training loop.
Orbax writes into a temporary directory and renames on commit, so a killed run never leaves a
checkpoint that looks complete; restores land directly in the target shardings. Before restoring,
the stored tree is compared with the expected one and every mismatch is named.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

TRAINABLE, OPT_STATE, STATE, DATA, META = "trainable", "opt_state", "state", "data_iter", "meta"


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model it is being restored into."""


@dataclasses.dataclass
class Restored:
    step: int
    trainable: Any
    opt_state: Any | None
    rng: jax.Array | None
    data_iter: Any | None
    meta: dict


def abstract_like(tree: Any) -> Any:
    """Restore target for ``tree``: shapes, dtypes and shardings, no data."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


def _paths_and_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(x.shape) for p, x in flat}


def check_compatible(stored: Any, expected: Any, item: str) -> None:
    """Raise `CheckpointMismatchError` naming every missing, unexpected or reshaped leaf."""
    have, want = _paths_and_shapes(stored), _paths_and_shapes(expected)
    problems = [f"missing {p}" for p in sorted(want.keys() - have.keys())]
    problems += [f"unexpected {p}" for p in sorted(have.keys() - want.keys())]
    problems += [
        f"{p}: checkpoint shape {have[p]} != model shape {want[p]}"
        for p in sorted(want.keys() & have.keys())
        if have[p] != want[p]
    ]
    if problems:
        shown = "; ".join(problems[:20]) + (" ..." if len(problems) > 20 else "")
        raise CheckpointMismatchError(f"checkpoint item '{item}' does not fit the model: {shown}")


class Checkpointer:
    """Keep-last-k checkpoints in ``workdir/checkpoints``; see the module docstring."""

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        handlers = {
            name: ocp.StandardCheckpointHandler() for name in (TRAINABLE, OPT_STATE, STATE)
        } | {name: ocp.JsonCheckpointHandler() for name in (DATA, META)}
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self,
        step: int,
        *,
        trainable: Any,
        opt_state: Any,
        rng: jax.Array,
        data_iter: Any,
        meta: dict,
    ) -> None:
        state = {"step": np.asarray(step, np.int64), "rng": np.asarray(jax.random.key_data(rng))}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    TRAINABLE: ocp.args.StandardSave(trainable),
                    OPT_STATE: ocp.args.StandardSave(opt_state),
                    STATE: ocp.args.StandardSave(state),
                    DATA: ocp.args.JsonSave(data_iter),
                    META: ocp.args.JsonSave(meta),
                }
            ),
            force=True,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def read_meta(self, step: int | None = None) -> dict:
        step = self._step(step)
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            META
        ]

    def restore(
        self,
        abstract_trainable: Any,
        abstract_opt_state: Any | None = None,
        step: int | None = None,
    ) -> Restored:
        """Restore into the given abstract trees (ShapeDtypeStructs carrying shardings).

        Without ``abstract_opt_state`` only the trainable parameters are read: the "adapters
        only into a fresh base" case.
        """
        step = self._step(step)
        metadata = self.manager.item_metadata(step)
        check_compatible(metadata[TRAINABLE], abstract_trainable, TRAINABLE)
        items = {
            TRAINABLE: ocp.args.StandardRestore(abstract_trainable),
            META: ocp.args.JsonRestore(),
        }
        if abstract_opt_state is not None:
            check_compatible(metadata[OPT_STATE], abstract_opt_state, OPT_STATE)
            items[OPT_STATE] = ocp.args.StandardRestore(abstract_opt_state)
            items[STATE] = ocp.args.StandardRestore()
            items[DATA] = ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        full = abstract_opt_state is not None
        return Restored(
            step=int(out[STATE]["step"]) if full else step,
            trainable=out[TRAINABLE],
            opt_state=out[OPT_STATE] if full else None,
            rng=jax.random.wrap_key_data(np.asarray(out[STATE]["rng"])) if full else None,
            data_iter=out[DATA] if full else None,
            meta=out[META],
        )

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None or step not in self.manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint{'' if step is None else f' for step {step}'} in {self.directory}"
            )
        return step
