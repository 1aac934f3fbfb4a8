"""Attach adapters to a backbone parameter tree by rule, merge them back, and store the result.

Layer paths are the module paths of ``linear_layer_paths`` (``blocks_3/attn/qkv``); a layer's
params are ``kernel`` (the residual once adapted), ``bias`` and ``adapter_<name>/{a, b}``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from recyclelora_jax.models.adapters import ADAPTER_PREFIX, AdapterLayout, AdapterSpec
from recyclelora_jax.models.dinov2 import DinoV2, DinoV2Arch, linear_layer_paths
from recyclelora_jax.peft.init import InitResult, get_init, run_init

Params = dict[str, Any]
_CACHE_VERSION = "1"


@dataclasses.dataclass(frozen=True)
class AttachRule:
    """Adapt the layers whose path matches ``pattern`` (``re.search``) inside ``blocks``
    (a ``[start, stop)`` range, None for all), with init ``method`` and ``ranks`` per adapter."""

    pattern: str
    method: str
    ranks: tuple[tuple[str, int], ...]
    alpha: float = 1.0
    blocks: tuple[int, int] | None = None

    def matches(self, path: str) -> bool:
        if not re.search(self.pattern, path):
            return False
        if self.blocks is None:
            return True
        found = re.match(r"blocks_(\d+)/", path)
        return found is not None and self.blocks[0] <= int(found.group(1)) < self.blocks[1]

    @property
    def spec(self) -> AdapterSpec:
        return AdapterSpec(self.ranks, self.alpha / sum(r for _, r in self.ranks))


def resolve_rules(arch: DinoV2Arch, rules: Sequence[AttachRule]) -> dict[str, AttachRule]:
    """Layer path -> the first rule that matches it (layers no rule matches stay plain)."""
    for rule in rules:
        names = get_init(rule.method).adapter_names
        if sorted(n for n, _ in rule.ranks) != sorted(names):
            raise ValueError(
                f"rule {rule.pattern!r}: method {rule.method!r} needs ranks for {list(names)}, "
                f"got {[n for n, _ in rule.ranks]}"
            )
    chosen = {}
    for path in linear_layer_paths(arch):
        rule = next((r for r in rules if r.matches(path)), None)
        if rule is not None:
            chosen[path] = rule
    idle = [r for r in rules if not any(c is r for c in chosen.values())]
    if idle:
        raise ValueError(
            f"attach rules adapt no linear layer of {arch} (layers: {linear_layer_paths(arch)[:4]}"
            f"...): {idle}"
        )
    return chosen


def adapter_layout(arch: DinoV2Arch, rules: Sequence[AttachRule]) -> AdapterLayout:
    """The ``AdapterLayout`` for ``DinoV2(adapters=...)``; needs no kernels."""
    return tuple((path, rule.spec) for path, rule in resolve_rules(arch, rules).items())


@functools.cache
def _plain_shapes(arch: DinoV2Arch, param_dtype: Any) -> Params:
    model = DinoV2(arch, out_indices=(), param_dtype=param_dtype)
    image = jax.ShapeDtypeStruct((1, arch.patch_size, arch.patch_size, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), image)["params"]


def attach_shapes(
    arch: DinoV2Arch, rules: Sequence[AttachRule], param_dtype: Any = jnp.float32
) -> tuple[Params, AdapterLayout]:
    """Shapes (``jax.ShapeDtypeStruct``) of the adapted backbone params, allocating nothing:
    the plain backbone's (traced once per architecture) plus ``a`` (in, r), ``b`` (r, out) of
    every adapter, as ``attach`` creates them."""
    layout = adapter_layout(arch, rules)
    flat = traverse_util.flatten_dict(_plain_shapes(arch, param_dtype), sep="/")
    for path, spec in layout:
        n_in, n_out = flat[f"{path}/kernel"].shape
        for name, rank in spec.ranks:
            prefix = f"{path}/{ADAPTER_PREFIX}{name}"
            flat[f"{prefix}/a"] = jax.ShapeDtypeStruct((n_in, rank), jnp.float32)
            flat[f"{prefix}/b"] = jax.ShapeDtypeStruct((rank, n_out), jnp.float32)
    return traverse_util.unflatten_dict(flat, sep="/"), layout


def _layer(params: Params, path: str) -> Params:
    node = params
    for part in path.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(f"backbone params have no layer {path!r} (missing {part!r})")
        node = node[part]
    if "kernel" not in node:
        raise KeyError(f"layer {path!r} has no 'kernel' (keys: {sorted(node)})")
    return node


def _cache_key(path: str, kernel: np.ndarray, rule: AttachRule, seed: int) -> str:
    digest = hashlib.blake2b(digest_size=20)
    meta = (_CACHE_VERSION, path, rule.method, rule.ranks, rule.alpha, seed, kernel.shape)
    digest.update(repr((*meta, str(kernel.dtype))).encode())
    digest.update(np.ascontiguousarray(kernel).tobytes())  # also for bfloat16 kernels
    return digest.hexdigest()


def _init_layer(
    path: str, kernel: np.ndarray, rule: AttachRule, seed: int, cache_dir: Path | None
) -> InitResult:
    """One layer's init, read from / written to ``cache_dir/<hash>.npz`` when given."""
    file = cache_dir / f"{_cache_key(path, kernel, rule, seed)}.npz" if cache_dir else None
    if file is not None and file.exists():
        with np.load(file) as data:
            adapters = {n: (data[f"{n}/a"], data[f"{n}/b"]) for n, _ in rule.ranks}
            return data["residual"], adapters, float(data["scale"])
    # A per-layer seed keeps random inits independent of thread scheduling and layer order.
    layer_seed = int.from_bytes(hashlib.blake2b(f"{seed}/{path}".encode()).digest()[:4], "little")
    result = run_init(rule.method, kernel, dict(rule.ranks), rule.alpha, layer_seed)
    if file is not None:
        residual, adapters, scale = result
        arrays = {f"{n}/{k}": v for n, (a, b) in adapters.items() for k, v in (("a", a), ("b", b))}
        tmp = file.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, residual=residual, scale=np.float64(scale), **arrays)
        tmp.replace(file)
    return result


def attach(
    params: Params,
    arch: DinoV2Arch,
    rules: Sequence[AttachRule],
    *,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> tuple[Params, AdapterLayout]:
    """Initialise adapters on pretrained backbone ``params`` (the tree under ``"params"``).

    Layers run on ``workers`` threads (default: one per core; LAPACK releases the GIL), BLAS
    limited to one thread: one layer per core beats OpenBLAS's own threads on geqp3, which is
    mostly matrix-vector work and degrades badly when cores are shared (``docs/BENCHMARKS.md``),
    and the bits of every result are then independent of ``workers``. Returns the adapted params
    (kernels replaced by residuals, cast to the kernel dtype) and the layout to build
    ``DinoV2(..., adapters=layout)``.
    """
    chosen = resolve_rules(arch, rules)
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    kernels = {path: np.asarray(_layer(params, path)["kernel"]) for path in chosen}

    def job(path: str) -> InitResult:
        return _init_layer(path, kernels[path], chosen[path], seed, cache)

    workers = workers or os.cpu_count() or 1
    with (
        threadpool_limits(limits=1),
        ThreadPoolExecutor(workers) as pool,
    ):
        done = pool.map(job, chosen)
        results = list(tqdm(done, total=len(chosen), desc="init adapters", disable=not progress))
    flat = traverse_util.flatten_dict(params, sep="/")
    for path, (residual, adapters, _) in zip(chosen, results, strict=True):
        dtype = kernels[path].dtype
        flat[f"{path}/kernel"] = jnp.asarray(residual, dtype)
        for name, (a, b) in adapters.items():
            flat[f"{path}/{ADAPTER_PREFIX}{name}/a"] = jnp.asarray(a)
            flat[f"{path}/{ADAPTER_PREFIX}{name}/b"] = jnp.asarray(b)
    layout = tuple((path, rule.spec) for path, rule in chosen.items())
    return traverse_util.unflatten_dict(flat, sep="/"), layout


def _update(layer: Params, spec: AdapterSpec, path: str) -> jax.Array:
    """``scale * sum_i a_i @ b_i`` of one layer, in float32."""
    total = None
    for name, _ in spec.ranks:
        key = ADAPTER_PREFIX + name
        if key not in layer:
            raise KeyError(f"layer {path!r} has no adapter {key!r} (keys: {sorted(layer)})")
        ab = jnp.asarray(layer[key]["a"], jnp.float32) @ jnp.asarray(layer[key]["b"], jnp.float32)
        total = ab if total is None else total + ab
    return spec.scale * total


def merge(params: Params, layout: AdapterLayout) -> Params:
    """Fold every adapter into its kernel: a plain tree for ``DinoV2`` without adapters."""
    out = jax.tree.map(lambda x: x, params)  # fresh dicts, shared leaves
    for path, spec in layout:
        layer = _layer(out, path)
        kernel = layer["kernel"]
        merged = jnp.asarray(kernel, jnp.float32) + _update(layer, spec, path)
        for name, _ in spec.ranks:
            del layer[ADAPTER_PREFIX + name]
        layer["kernel"] = merged.astype(kernel.dtype)
    return out


def unmerge(merged: Params, adapters_from: Params, layout: AdapterLayout) -> Params:
    """Inverse of ``merge``: split merged kernels again, given the adapters (taken from
    ``adapters_from``, an adapted tree); e.g. to resume from a merged export."""
    out = jax.tree.map(lambda x: x, merged)
    for path, spec in layout:
        source, layer = _layer(adapters_from, path), _layer(out, path)
        for name, _ in spec.ranks:
            layer[ADAPTER_PREFIX + name] = source[ADAPTER_PREFIX + name]
        kernel = layer["kernel"]
        residual = jnp.asarray(kernel, jnp.float32) - _update(layer, spec, path)
        layer["kernel"] = residual.astype(kernel.dtype)
    return out
