"""Hungarian matching with static shapes and static trip counts (jit-, vmap- and TPU-friendly).

The solver is the shortest-augmenting-path (Jonker-Volgenant) form that scipy's
``linear_sum_assignment`` uses: the K targets are added one by one, each by a Dijkstra search
over the Q queries in reduced costs, then the path found is flipped. A search from the i-th
target settles at most i + 1 queries, so every loop runs a fixed K steps (finished searches and
walks are masked): the compiler knows every trip count (its cost model gives up on loops whose
count depends on the data, as those of ``optax.assignment.hungarian_algorithm`` do) and a
vmapped call over images and prediction sets runs them in lockstep. Rows and entries are read
by one-hot selects rather than by index: under ``vmap`` an index is a gather, and a select-sum
is exact where a one-hot matmul in float32 would round on the TPU's MXU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Stand-in for NaN/inf costs: such pairs are matched only when nothing else is left
# (transformers uses the dtype's max, which overflows inside the algorithm's sums).
_BAD_COST = 1e8


def hungarian_match(cost: jax.Array, valid: jax.Array) -> jax.Array:
    """Minimum-cost assignment of the K target columns of ``cost`` (Q, K) to distinct queries.

    ``valid`` (K,) marks real targets. Padded columns get one constant cost, so they take
    whichever rows are left and the assignment of the real columns is the optimum of the
    real sub-matrix (needs Q >= K). Returns (K,) int32: the query matched to each target
    (meaningless where ``valid`` is False).
    """
    q, k = cost.shape
    if q < k:
        raise ValueError(f"need at least as many queries as targets, got cost shape {cost.shape}")
    cost = jnp.nan_to_num(cost, nan=_BAD_COST, posinf=_BAD_COST, neginf=-_BAD_COST)
    cost = jnp.where(valid[None, :], cost, 0.0)
    return _shortest_augmenting_paths(jax.lax.stop_gradient(cost).T.astype(jnp.float32))


def _pick(x: jax.Array, at: jax.Array) -> jax.Array:
    """``x`` at the one-hot mask ``at`` (summed over its last axis), without an index."""
    return jnp.where(at, x, jnp.zeros((), x.dtype)).sum(-1)


def _shortest_augmenting_paths(c: jax.Array) -> jax.Array:
    """Column of each row in a minimum-cost assignment of the finite (K, Q) ``c``, K <= Q.

    State as in scipy: row potentials ``u`` (K,), column potentials ``v`` (Q,), ``col4row``
    and ``row4col`` (-1 where free).
    """
    k, q = c.shape
    rows, cols = jnp.arange(k), jnp.arange(q)
    inf = jnp.asarray(jnp.inf, c.dtype)

    def add_row(cur, state):
        u, v, col4row, row4col = state

        def search_step(_, s):
            """Settle the nearest unsettled column; stop at a free one (the sink)."""
            i, min_val, sink, dist, path, seen_row, seen_col = s
            at_i = rows == i
            reduced = min_val + _pick(c.T, at_i) - _pick(u, at_i) - v
            closer = ~seen_col & (reduced < dist)
            dist = jnp.where(closer, reduced, dist)
            path = jnp.where(closer, i, path)
            open_dist = jnp.where(seen_col, inf, dist)
            lowest = open_dist.min()
            tied = open_dist == lowest
            free = tied & (row4col < 0)  # ties go to a free column, as in scipy
            at_j = cols == jnp.where(free.any(), jnp.argmax(free), jnp.argmax(tied))
            owner = _pick(row4col, at_j)
            new = (
                jnp.where(owner < 0, i, owner),
                lowest,
                jnp.where(owner < 0, jnp.argmax(at_j), -1),
                dist,
                path,
                seen_row | at_i,
                seen_col | at_j,
            )
            return jax.tree.map(lambda a, b: jnp.where(sink >= 0, a, b), s, new)

        start = (
            cur,
            jnp.zeros((), c.dtype),
            jnp.asarray(-1),
            jnp.full((q,), inf),
            jnp.full((q,), -1),
            jnp.zeros((k,), bool),
            jnp.zeros((q,), bool),
        )
        _, min_val, sink, dist, path, seen_row, seen_col = jax.lax.fori_loop(
            0, k, search_step, start
        )
        # New potentials keep every reduced cost >= 0 and those on the assignment at 0.
        dist_of_row = _pick(dist[None, :], col4row[:, None] == cols[None, :])
        u = u + jnp.where(rows == cur, min_val, 0.0)
        u = u + jnp.where(seen_row & (rows != cur), min_val - dist_of_row, 0.0)
        v = v - jnp.where(seen_col, min_val - dist, 0.0)

        def flip_step(_, s):
            """One edge back along the path from the sink: its column goes to its row."""
            j, col4row, row4col, done = s
            at_j = cols == j
            i = _pick(path, at_j)
            at_i = rows == i
            new = (
                _pick(col4row, at_i),
                jnp.where(at_i, j, col4row),
                jnp.where(at_j, i, row4col),
                i == cur,
            )
            return jax.tree.map(lambda a, b: jnp.where(done, a, b), s, new)

        _, col4row, row4col, _ = jax.lax.fori_loop(
            0, k, flip_step, (sink, col4row, row4col, jnp.asarray(False))
        )
        return u, v, col4row, row4col

    start = (
        jnp.zeros((k,), c.dtype),
        jnp.zeros((q,), c.dtype),
        jnp.full((k,), -1),
        jnp.full((q,), -1),
    )
    return jax.lax.fori_loop(0, k, add_row, start)[2].astype(jnp.int32)
