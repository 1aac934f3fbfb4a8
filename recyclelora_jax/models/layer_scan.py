"""Consecutive identical layers run as one ``jax.lax.scan``, their parameters kept per layer.

XLA compiles a loop body once, so N scanned layers cost about one layer's compile time where an
unrolled Python loop costs N. ``flax.linen.scan`` would store the layers' parameters stacked
under one name; here the tree stays exactly as the unrolled loop builds it (``blocks_0``,
``blocks_1``, ...) and the per-layer subtrees are stacked inside the forward pass, so gradients
reach the same leaves and checkpoints, converters, adapter paths and optimizer rules see no
difference. A run is only scanned when its layers agree in structure (`signature`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from recyclelora_jax.models import loops

Params = Any
Carry = Any


def signature(params: Params) -> Hashable:
    """Tree structure, shapes and dtypes: what must agree for layers to share one scan body."""
    leaves, tree = jax.tree.flatten(params)
    return tree, tuple((tuple(x.shape), jnp.dtype(x.dtype).name) for x in leaves)


def uniform_runs(keys: Sequence[Hashable]) -> list[slice]:
    """Maximal runs of consecutive equal keys, as slices covering ``keys`` in order."""
    runs, start = [], 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start]:
            runs.append(slice(start, i))
            start = i
    return runs


def scan_over_layers(
    step: Callable[[Params, Carry, Any], Any],
    params: Sequence[Params],
    carry: Carry,
    xs: Any = None,
    with_outputs: bool = False,
) -> Any:
    """``carry = step(params[i], carry, xs[i])`` for each layer in order, as one scan over the
    stacked per-layer parameters (all of one `signature`) and the leading axis of ``xs``.

    With ``with_outputs`` the step returns ``(carry, y)`` and the result is ``(carry, ys)``,
    the per-layer ``y`` stacked along a leading axis."""
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *params)
    if with_outputs:
        return loops.scan(lambda c, p_x: step(p_x[0], c, p_x[1]), carry, (stacked, xs))
    body = lambda c, p_x: (step(p_x[0], c, p_x[1]), None)
    return loops.scan(body, carry, (stacked, xs))[0]
