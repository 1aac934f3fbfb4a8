"""Orbax checkpoints of what training changes: trainable params, optimizer state (with the EMA
weights where the recipe keeps them), step and data-iterator state, plus a JSON `meta` item
(full config, pointer to the frozen base weights).

Each item is separate (`ocp.args.Composite`), so restoring "adapters only" into a fresh base is
one item read, and a checkpoint is a plain pytree anyone can load without the training loop.
Orbax writes into a temporary directory and renames on commit, so a killed run never leaves a
checkpoint that looks complete; restores land directly in the target shardings. Before restoring,
the stored tree is compared with the expected one and every mismatch is named.

Integrity: every save also writes an `integrity` item, a checksum of each array leaf and of each
JSON item, in the same atomic commit. Every restore recomputes them from what it read; a damaged
checkpoint (unreadable file, undecodable JSON, changed content) raises `CheckpointCorruptError`
naming the step and the file. Restoring the latest checkpoint falls back, with a warning, to the
newest intact one; the damaged directory is moved aside (``<step>.damaged``) only when training
reaches its step again and needs the name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

TRAINABLE, OPT_STATE, STATE, DATA, META = "trainable", "opt_state", "state", "data_iter", "meta"
INTEGRITY = "integrity"
ARRAY_ITEMS, JSON_ITEMS = (TRAINABLE, OPT_STATE, STATE), (DATA, META, INTEGRITY)


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model it is being restored into."""


class CheckpointCorruptError(ValueError):
    """A checkpoint's files cannot be read or do not match the checksums written with them."""


class BaseMismatchError(ValueError):
    """The frozen base is not the one the checkpoint was trained on."""


@dataclasses.dataclass
class Restored:
    step: int
    trainable: Any
    opt_state: Any | None
    data_iter: Any | None
    meta: dict


def abstract_like(tree: Any) -> Any:
    """Restore target for ``tree``: shapes, dtypes and shardings, no data."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


def _keystr(path: tuple) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _paths_and_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_keystr(p): tuple(x.shape) for p, x in flat}


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


# ----------------------------------------------------------------------------- checksums


@jax.jit
def _device_sums(tree: Any) -> Any:
    """Per leaf, (sum of words, sum of position * word) mod 2**32 over its bit patterns: a
    Fletcher-style checksum computed where the array lives, exact under any sharding."""

    def sums(x: jax.Array) -> jax.Array:
        if x.dtype == jnp.bool_:
            words = x.astype(jnp.uint32)
        elif x.dtype.itemsize >= 4:  # 8-byte leaves gain a trailing axis of two words
            words = jax.lax.bitcast_convert_type(x, jnp.uint32)
        else:
            words = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{x.dtype.itemsize * 8}"))
        words = words.astype(jnp.uint32).ravel()
        position = jnp.arange(1, words.size + 1, dtype=jnp.uint32)
        return jnp.stack([words.sum(dtype=jnp.uint32), (words * position).sum(dtype=jnp.uint32)])

    return jax.tree.map(sums, tree)


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def array_checksums(tree: Any) -> dict[str, str]:
    """``{leaf path: checksum}``: host (numpy) leaves by SHA-256 of their bytes, device arrays by
    `_device_sums` (no copy to the host); the scheme is part of the value."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    groups: dict[frozenset, dict[str, jax.Array]] = {}  # one computation per set of devices
    for p, x in flat:
        if isinstance(x, jax.Array):
            groups.setdefault(frozenset(x.sharding.device_set), {})[_keystr(p)] = x
    sums = jax.device_get([_device_sums(group) for group in groups.values()])
    out = {k: "sum64:" + "".join(f"{int(s):08x}" for s in v) for g in sums for k, v in g.items()}
    for p, x in flat:
        if not isinstance(x, jax.Array):
            x = np.ascontiguousarray(x)
            out[_keystr(p)] = _sha256(x.dtype.str.encode() + x.tobytes())
    return out


def json_checksum(value: Any) -> str:
    return _sha256(json.dumps(value, sort_keys=True).encode())


def fingerprint(tree: Any) -> str:
    """One checksum of a whole tree (the frozen base), from its leaves' `array_checksums`."""
    return json_checksum(array_checksums(tree))


def check_base(meta: dict, base_fingerprint: str, base_file: str, where: Path, *, allow: bool):
    """Refuse (or, with ``allow``, warn about) a frozen base other than the checkpoint's: trained
    adapters over another base of the same shapes would give silently wrong results."""
    stored = meta.get("base_fingerprint")
    if stored is None:
        log.warning("checkpoint in %s stores no base fingerprint: the base is not verified", where)
    elif stored != base_fingerprint:
        message = (
            f"the frozen base loaded from {base_file or '<seeded random init>'} "
            f"({base_fingerprint[:19]}) is not the one the checkpoint in {where} was trained on: "
            f"{meta.get('base_weights') or '<seeded random init>'} ({stored[:19]})"
        )
        if not allow:
            raise BaseMismatchError(message + "; pass --allow_other_base to use it anyway")
        log.warning("%s; continuing as asked", message)


def _as_stored(value: Any, scheme: str) -> Any:
    """A restored leaf in the kind it was saved as (the scheme tells which)."""
    return np.asarray(jax.device_get(value)) if scheme == "sha256" else jnp.asarray(value)


# ----------------------------------------------------------------------------- checkpointer


class Checkpointer:
    """Keep-last-k checkpoints in ``workdir/checkpoints``; see the module docstring."""

    def __init__(
        self, directory: str | Path, keep: int = 3, async_save: bool = True, create: bool = True
    ):
        """``create=False`` (reading a finished run) refuses a missing directory instead of
        creating it, so a misspelt workdir is named, not left behind."""
        self.directory = Path(directory).absolute()
        if not create and not self.directory.is_dir():
            raise FileNotFoundError(f"no checkpoints at {self.directory} (is the workdir right?)")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=create, enable_async_checkpointing=async_save
        )
        handlers = {name: ocp.StandardCheckpointHandler() for name in ARRAY_ITEMS} | {
            name: ocp.JsonCheckpointHandler() for name in JSON_ITEMS
        }
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )
        self.damaged: set[int] = set()  # steps found damaged by this process

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self,
        step: int,
        *,
        trainable: Any,
        opt_state: Any,
        data_iter: Any,
        meta: dict,
    ) -> None:
        if step in self.damaged:
            self._move_aside(step)
        state = {"step": np.asarray(step, np.int64)}  # older checkpoints' unused "rng" is ignored
        arrays = {TRAINABLE: trainable, OPT_STATE: opt_state, STATE: state}
        integrity = {name: array_checksums(tree) for name, tree in arrays.items()}
        integrity |= {DATA: json_checksum(data_iter), META: json_checksum(meta)}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                **{name: ocp.args.StandardSave(tree) for name, tree in arrays.items()},
                **{DATA: ocp.args.JsonSave(data_iter), META: ocp.args.JsonSave(meta)},
                **{INTEGRITY: ocp.args.JsonSave(integrity)},
            ),
            force=True,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def read_meta(self, step: int | None = None) -> dict:
        """The ``meta`` item of ``step`` (default: the newest intact checkpoint), verified."""
        return self._newest_intact(step, lambda s: self._read_verified(s, META))

    def restore(
        self,
        abstract_trainable: Any,
        abstract_opt_state: Any | None = None,
        step: int | None = None,
    ) -> Restored:
        """Restore into the given abstract trees (ShapeDtypeStructs carrying shardings), every
        item verified against its checksums; without ``step``, the newest intact checkpoint.

        Without ``abstract_opt_state`` only the trainable parameters are read: the "adapters
        only into a fresh base" case.
        """
        targets = {TRAINABLE: abstract_trainable}
        if abstract_opt_state is not None:
            targets |= {OPT_STATE: abstract_opt_state, STATE: None}

        def read(step: int) -> Restored:
            stored = self._read(step, "_METADATA", self.manager.item_metadata)
            for name, target in targets.items():
                if target is not None:
                    check_compatible(stored[name], target, name)
            out = {name: self._read_verified(step, name, t) for name, t in targets.items()}
            out[META] = self._read_verified(step, META)
            if abstract_opt_state is None:
                return Restored(step, out[TRAINABLE], None, None, out[META])
            return Restored(
                step=int(out[STATE]["step"]),
                trainable=out[TRAINABLE],
                opt_state=out[OPT_STATE],
                data_iter=self._read_verified(step, DATA),
                meta=out[META],
            )

        return self._newest_intact(step, read)

    def read_item(self, name: str, step: int | None = None) -> Any:
        """Item ``name`` as stored (host arrays, no target tree needed), verified; without
        ``step``, of the newest intact checkpoint. E.g. the EMA weights for evaluation."""
        return self._newest_intact(step, lambda s: self._read_verified(s, name))

    # ------------------------------------------------------------------------- internals

    def _newest_intact(self, step: int | None, read):
        """``read(step)``; with no step given, of the newest checkpoint that is not damaged."""
        if step is not None:
            return read(self._require(step))
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        errors = []
        for candidate in steps:
            try:
                return read(candidate)
            except CheckpointCorruptError as err:
                self.damaged.add(candidate)
                errors.append(str(err))
                log.warning("%s; trying the checkpoint before it", err)
        raise CheckpointCorruptError(
            f"no intact checkpoint in {self.directory}: " + "; ".join(errors)
        )

    def _require(self, step: int) -> int:
        if step not in self.manager.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}")
        return step

    def _read(self, step: int, file: str, read, *args):
        """``read(step, *args)`` with any failure to read or decode named by step and file."""
        try:
            return read(step, *args)
        except (CheckpointMismatchError, FileNotFoundError):
            raise
        except Exception as err:  # tensorstore, JSON, msgpack errors alike: the files are damaged
            path = self.directory / str(step) / file
            raise CheckpointCorruptError(
                f"checkpoint of step {step} is damaged: cannot read {path} "
                f"({type(err).__name__}: {err})"
            ) from err

    def _read_item(self, step: int, name: str, target: Any = None) -> Any:
        json_item = name in JSON_ITEMS
        arg = ocp.args.JsonRestore() if json_item else ocp.args.StandardRestore(target)
        return self.manager.restore(step, args=ocp.args.Composite(**{name: arg}))[name]

    def _checksums(self, step: int) -> dict | None:
        if INTEGRITY not in self._read(step, "_METADATA", self.manager.item_metadata):
            return None
        return self._read(step, f"{INTEGRITY}/metadata", self._read_item, INTEGRITY)

    def _read_verified(self, step: int, name: str, target: Any = None) -> Any:
        """Item ``name`` of ``step``, compared with the checksums written at save time."""
        file = f"{name}/metadata" if name in JSON_ITEMS else name
        value = self._read(step, file, self._read_item, name, target)
        expected = self._checksums(step)
        if expected is None:
            log.warning(
                "checkpoint of step %d in %s has no checksums (written before they existed): "
                "%s not verified",
                step,
                self.directory,
                name,
            )
            return value
        if name in JSON_ITEMS:
            bad = [] if json_checksum(value) == expected[name] else [file]
        else:
            want = expected[name]
            flat = jax.tree_util.tree_flatten_with_path(value)[0]
            stored = {
                _keystr(p): _as_stored(x, want.get(_keystr(p), "sum64").split(":")[0])
                for p, x in flat
            }
            got = array_checksums(stored)
            bad = [f"{name}/{k}" for k in sorted(want) if got.get(k) != want[k]]
        if bad:
            raise CheckpointCorruptError(
                f"checkpoint of step {step} is damaged: {self.directory / str(step)} "
                f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} differ from the "
                "checksums written at save time"
            )
        return value

    def _move_aside(self, step: int) -> None:
        """Rename a damaged checkpoint out of the step list so its step can be saved again."""
        source = self.directory / str(step)
        if jax.process_index() == 0 and source.exists():
            target = source.with_name(f"{step}.damaged")
            n = 1
            while target.exists():
                target, n = source.with_name(f"{step}.damaged{n}"), n + 1
            source.rename(target)
            log.warning("moved the damaged checkpoint %s aside to %s", source, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint_move_aside_{step}")
        self.manager.reload()
        self.damaged.discard(step)
