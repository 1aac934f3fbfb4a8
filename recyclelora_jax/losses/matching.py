"""Hungarian matching with static shapes, JAX-native (jit-able, vmap-able, shardable)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

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
    rows, cols = optax.assignment.hungarian_algorithm(jax.lax.stop_gradient(cost))
    return jnp.zeros((k,), jnp.int32).at[cols].set(rows.astype(jnp.int32))
