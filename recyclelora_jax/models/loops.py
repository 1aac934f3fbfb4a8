"""The package's sequential loops (scanned layers, the loss's prediction sets, gradient
accumulation), with one switch that unrolls them all.

``compiled.cost_analysis()`` counts a ``while`` body once, whatever its trip count, so a program
with scanned layers reports a fraction of its FLOPs and bytes. Inside `unrolled` every loop here
is traced with ``unroll=True`` (no ``while`` op: each trip is its own code), which is the same
computation and what ``preflight --unrolled_costs`` compiles to count every trip. The switch is
read while tracing: it changes a program only when that program is traced inside it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import jax

_UNROLLED = contextvars.ContextVar("recyclelora_jax_unrolled_loops", default=False)


@contextlib.contextmanager
def unrolled() -> Iterator[None]:
    """Trace every loop of this module fully unrolled while the context is open."""
    token = _UNROLLED.set(True)
    try:
        yield
    finally:
        _UNROLLED.reset(token)


def scan(f: Callable[[Any, Any], tuple[Any, Any]], init: Any, xs: Any) -> tuple[Any, Any]:
    """``jax.lax.scan(f, init, xs)``, fully unrolled inside `unrolled`."""
    return jax.lax.scan(f, init, xs, unroll=True if _UNROLLED.get() else 1)


def sequential_map(f: Callable[[Any], Any], xs: Any) -> Any:
    """``jax.lax.map(f, xs)``: one slice of ``xs`` alive at a time; unrolled inside `unrolled`."""
    return scan(lambda _, x: (None, f(x)), None, xs)[1]
