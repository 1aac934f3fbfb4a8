"""The device mesh and the shardings of parameters, optimizer state and batches.

One code path from one CPU to a multi-host pod: a 2-D mesh ``("data", "fsdp")``. The batch is
split over both axes (every device sees its own examples); with ``fsdp > 1`` each parameter and
its optimizer state is additionally split along its largest divisible dimension over ``fsdp``,
so the frozen 300 M-parameter backbone is not replicated on every device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh; ``data=-1`` takes every device ``fsdp`` leaves. A single process
    may use fewer devices than it has (e.g. one device of eight, for comparisons). ``devices``
    defaults to ``jax.devices()`` (the preflight passes a TPU topology's devices)."""
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"mesh.fsdp={fsdp} must divide the {n} devices")
    if data == -1:
        data = n // fsdp
    size = data * fsdp
    if size > n or (size < n and jax.process_count() > 1):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not fit the {n} devices")
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=(auto, auto), devices=devices[:size])


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int = 2**12) -> PartitionSpec:
    """Split the largest dimension divisible by ``fsdp``; small leaves stay replicated."""
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            spec: list[Any] = [None] * len(shape)
            spec[dim] = "fsdp"
            return PartitionSpec(*spec)
    return PartitionSpec()


def tree_shardings(mesh: Mesh, tree: Any) -> Any:
    """NamedShardings for a tree of arrays or ShapeDtypeStructs (FSDP rule, see `fsdp_spec`)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp)), tree)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's slice of the batch -> one global array per key, split over the mesh."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }


def check_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """The per-process batch size, after checking the global batch splits evenly."""
    n_dev, n_proc = mesh.size, jax.process_count()
    if global_batch_size % n_dev:
        raise ValueError(f"global batch {global_batch_size} is not divisible by {n_dev} devices")
    return global_batch_size // n_proc
