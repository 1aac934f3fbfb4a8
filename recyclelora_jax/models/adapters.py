"""The adapted linear layer: a frozen residual kernel plus named low-rank adapters."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

ADAPTER_PREFIX = "adapter_"


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """Adapters of one linear layer: `ranks` as ((name, rank), ...) sharing one `scale`."""

    ranks: tuple[tuple[str, int], ...]
    scale: float

    @property
    def total_rank(self) -> int:
        return sum(r for _, r in self.ranks)


# Layer path inside the backbone (e.g. "blocks_3/attn/qkv") -> its adapters. A tuple of pairs, so
# that modules holding it stay hashable.
AdapterLayout = tuple[tuple[str, AdapterSpec], ...]


class AdaptedDense(nn.Module):
    """`y = x @ kernel + bias + scale * sum_i (x @ a_i) @ b_i`.

    `kernel` is the frozen residual kernel; each adapter `i` lives under `adapter_<name>` with
    `a` (in, r) and `b` (r, out). The rank-r product `a @ b` is never formed, and the adapters
    of a layer run as one concatenated (in, sum r) / (sum r, out) pair: two thin matmuls per
    layer, not two per adapter.
    """

    features: int
    spec: AdapterSpec
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    adapter_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = x.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (n_in, self.features), self.param_dtype
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        y = x @ kernel.astype(dtype) + bias.astype(dtype)
        if not self.spec.ranks:
            return y
        pairs = [
            _Adapter(rank, self.features, self.adapter_dtype, name=ADAPTER_PREFIX + name)(n_in)
            for name, rank in self.spec.ranks
        ]
        a = jnp.concatenate([p[0] for p in pairs], axis=1).astype(dtype)
        b = jnp.concatenate([p[1] for p in pairs], axis=0).astype(dtype)
        # On (tokens, in), not (B, T, in): the weight gradients then contract one dimension,
        # which XLA:CPU does in place, where contracting (B, T) made it copy the (B, T, out)
        # output gradient into a transposed layout (docs/BENCHMARKS.md, training step).
        h = (x.reshape(-1, n_in) @ a) * jnp.asarray(self.spec.scale, dtype)
        return y + (h @ b).reshape(y.shape)


class _Adapter(nn.Module):
    """One low-rank pair's parameters `a` (in, r) and `b` (r, out)."""

    rank: int
    features: int
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, n_in: int) -> tuple[jax.Array, jax.Array]:
        a = self.param("a", nn.initializers.zeros, (n_in, self.rank), self.param_dtype)
        b = self.param("b", nn.initializers.zeros, (self.rank, self.features), self.param_dtype)
        return a, b


def make_dense(
    features: int,
    name: str,
    path: str,
    layout: AdapterLayout | Mapping[str, AdapterSpec],
    dtype: jnp.dtype | None,
    param_dtype: jnp.dtype,
) -> nn.Module:
    """A plain `nn.Dense` or, where the layout names `path`, an `AdaptedDense`."""
    spec = dict(layout).get(path)
    if spec is None:
        return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name)
    return AdaptedDense(features, spec, dtype=dtype, param_dtype=param_dtype, name=name)
