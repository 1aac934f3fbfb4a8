"""Hungarian matching of the set loss on CPU: the project's static-trip-count solver against
``optax.assignment.hungarian_algorithm`` (what it replaced) and scipy's ``linear_sum_assignment``.

One call matches every (prediction set, image) pair of a step, as the loss does: ``--problems``
random (``--queries``, ``--classes``) float32 cost matrices with about a third of the classes
absent (padded columns). JAX solvers are jitted and vmapped (compile time reported apart);
scipy loops over the problems on the real sub-matrices. Each solver's total cost is checked
against scipy's.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy
from quiet import check_load, time_calls
from scipy.optimize import linear_sum_assignment

from recyclelora_jax.losses import hungarian_match


def optax_match(cost: jax.Array, valid: jax.Array) -> jax.Array:
    """The replaced matcher: same padding, optax's Hungarian algorithm."""
    cost = jnp.where(valid[None, :], cost, 0.0)
    rows, cols = optax.assignment.hungarian_algorithm(cost)
    return jnp.zeros((cost.shape[1],), jnp.int32).at[cols].set(rows.astype(jnp.int32))


def scipy_match(cost: np.ndarray, valid: np.ndarray) -> np.ndarray:
    out = np.zeros(valid.shape, np.int64)
    for c, v, o in zip(cost, valid, out, strict=True):
        rows, cols = linear_sum_assignment(c[:, v])
        o[np.flatnonzero(v)[cols]] = rows
    return out


def total(cost: np.ndarray, valid: np.ndarray, match: np.ndarray) -> np.ndarray:
    picked = np.take_along_axis(cost, np.asarray(match)[:, None, :], axis=1)[:, 0]
    return np.where(valid, picked, 0.0).sum(-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", type=int, default=40, help="sets x images (recipe: 10 x 4)")
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--allow-loaded", action="store_true", help="run (flagged) on a busy machine")
    args = p.parse_args()
    load = check_load(args.allow_loaded)
    rng = np.random.default_rng(0)
    shape = (args.problems, args.queries, args.classes)
    cost = rng.normal(size=shape).astype(np.float32)
    valid = rng.random((args.problems, args.classes)) < 0.67
    valid[:, 0] = True
    c, v = jnp.asarray(cost), jnp.asarray(valid)

    want = total(cost, valid, scipy_match(cost, valid))
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, load {load:.2f}; jax "
        f"{jax.__version__}, optax {optax.__version__}, scipy {scipy.__version__}; "
        f"{args.problems} problems of {args.queries} queries x {args.classes} classes"
    )
    print(f"{'solver':<34}{'compile s':>10}{'run ms':>10}  max |cost - scipy|")
    for name, fn in (("project (static trip counts)", hungarian_match), ("optax", optax_match)):
        t0 = time.perf_counter()
        compiled = jax.jit(jax.vmap(fn)).lower(c, v).compile()
        compile_s = time.perf_counter() - t0
        _, runs, match = time_calls(
            lambda compiled=compiled: jax.block_until_ready(compiled(c, v)), args.repeats
        )
        err = np.abs(total(cost, valid, match) - want).max()
        print(f"{name:<34}{compile_s:>10.2f}{min(runs) * 1e3:>10.2f}  {err:.1e}")
    _, runs, _ = time_calls(lambda: scipy_match(cost, valid), args.repeats)
    print(f"{'scipy linear_sum_assignment':<34}{'-':>10}{min(runs) * 1e3:>10.2f}  0")


if __name__ == "__main__":
    main()
