"""Adapter initialisations: pure host-side functions of one pretrained Flax kernel.

Every method maps a kernel (in, out) to ``(residual_kernel, adapters, scale)`` with
``adapters[name] = (a, b)``, ``a`` (in, r) and ``b`` (r, out), such that
``residual + scale * sum(a @ b) == kernel`` up to float32 rounding: the adapted network starts as
the pretrained one (LoRA keeps it trivially with ``b = 0``). Formulas are written in RECIPE.md
§2, §8 on the PyTorch weight ``W0 = kernel.T``; here ``a = A.T`` and ``b = B.T``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Adapters = dict[str, tuple[np.ndarray, np.ndarray]]
InitResult = tuple[np.ndarray, Adapters, float]


def _float32_kernel(kernel: np.ndarray | jax.Array) -> np.ndarray:
    kernel = np.asarray(kernel)
    if kernel.ndim != 2:
        raise ValueError(f"expected a 2-D (in, out) kernel, got shape {kernel.shape}")
    if not jnp.issubdtype(kernel.dtype, jnp.floating):  # numpy's check misses bfloat16
        raise ValueError(f"expected a floating-point kernel, got dtype {kernel.dtype}")
    return kernel.astype(np.float32)


@jax.jit
def _pivoted_qr_columns(w0: jax.Array, select: jax.Array) -> tuple[jax.Array, jax.Array]:
    q_cols, _, p = jax.scipy.linalg.qr_multiply(w0, select, mode="left", pivoting=True)
    return q_cols, p


def rrqr(w0: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``Q[:, columns]`` (out, len(columns)) and the 0-based pivots ``P`` (in,) of the pivoted
    QR ``W0[:, P] = Q R`` (LAPACK geqp3, as ``jax.scipy.linalg.qr(pivoting=True)``).

    The Householder reflectors are applied to the selected unit vectors (ormqr) instead of
    forming all of ``Q`` (orgqr): the same columns to float32 rounding, 10-30 % less time.
    Runs on the host CPU whatever the default backend: pivoted QR is CPU/GPU-only and this is a
    one-off initialisation, so it must not occupy (or fail on) the training accelerator.
    """
    w0 = np.asarray(w0, np.float32)
    select = np.zeros((min(w0.shape), len(columns)), np.float32)
    select[columns, np.arange(len(columns))] = 1.0
    cpu = jax.local_devices(backend="cpu")[0]
    q_cols, p = _pivoted_qr_columns(jax.device_put(w0, cpu), jax.device_put(select, cpu))
    return np.asarray(q_cols), np.asarray(p)


def _check_ranks(ranks: Sequence[int], k: int, shape: tuple[int, ...]) -> None:
    if any(r <= 0 for r in ranks) or sum(ranks) > k:
        raise ValueError(
            f"ranks {list(ranks)} must be positive and sum to at most min(in, out) = {k} "
            f"for kernel shape {shape}"
        )


def _rrqr_init(
    kernel: np.ndarray, parts: Sequence[tuple[str, int, bool]], alpha: float
) -> InitResult:
    """One pivoted QR serves every adapter; ``parts`` lists (name, rank, uses minor directions).

    A minor adapter takes ``Q[:, K-r:K]`` and the pivots ``P[K-r:K]`` (not the last entries of
    ``P``: a wide kernel has more pivots than ``K``); a major one ``Q[:, :r]`` and ``P[:r]``.
    """
    kernel = _float32_kernel(kernel)
    k = min(kernel.shape)
    _check_ranks([r for _, r, _ in parts], k, kernel.shape)
    cols = [np.arange(k - r, k) if minor else np.arange(r) for _, r, minor in parts]
    q_cols, piv = rrqr(kernel.T, np.concatenate(cols))
    scale = alpha / sum(r for _, r, _ in parts)
    residual = kernel.copy()
    adapters: Adapters = {}
    offset = 0
    for (name, r, _), idx in zip(parts, cols, strict=True):
        a = np.zeros((kernel.shape[0], r), np.float32)
        a[piv[idx], np.arange(r)] = 1.0
        b = np.ascontiguousarray(q_cols[:, offset : offset + r].T)
        offset += r
        # `a` is one-hot, so `s * a @ b` only touches the pivot rows (distinct across adapters).
        residual[piv[idx]] -= np.float32(scale) * b
        adapters[name] = (a, b)
    return residual, adapters, scale


def recyclelora(
    kernel: np.ndarray | jax.Array, r_main: int, r_sub: int, alpha: float = 1.0
) -> InitResult:
    """RecycleLoRA (RECIPE.md §2): ``main`` on the minor RRQR directions, ``sub`` on the major."""
    return _rrqr_init(kernel, [("main", r_main, True), ("sub", r_sub, False)], alpha)


def recyclelora_swapped(
    kernel: np.ndarray | jax.Array, r_main: int, r_sub: int, alpha: float = 1.0
) -> InitResult:
    """Ablation: ``main`` from the major RRQR directions, ``sub`` from the minor ones."""
    return _rrqr_init(kernel, [("main", r_main, False), ("sub", r_sub, True)], alpha)


def _svd_init(kernel: np.ndarray | jax.Array, rank: int, alpha: float, minor: bool) -> InitResult:
    """SVD components split evenly between ``a`` and ``b`` (PiSSA/MiLoRA/SoMA, RECIPE.md §8):
    ``B = U_r sqrt(S_r) / sqrt(s)``, ``A = sqrt(S_r) Vh_r / sqrt(s)``, residual ``W0 - s B A``."""
    kernel = _float32_kernel(kernel)
    _check_ranks([rank], min(kernel.shape), kernel.shape)
    scale = alpha / rank
    u, sv, vh = np.linalg.svd(kernel.T, full_matrices=False)
    idx = np.arange(len(sv) - rank, len(sv)) if minor else np.arange(rank)
    root = np.sqrt(sv[idx]) / np.sqrt(np.float32(scale))
    a = np.ascontiguousarray((root[:, None] * vh[idx]).T)
    b = np.ascontiguousarray((u[:, idx] * root).T)
    residual = kernel - np.float32(scale) * (a @ b)
    return residual, {"lora": (a, b)}, scale


def lora(kernel: np.ndarray | jax.Array, rank: int, alpha: float, seed: int) -> InitResult:
    """Plain LoRA (PEFT default): ``A`` Kaiming-uniform with ``a=sqrt(5)``, i.e. U(±1/sqrt(in)),
    ``B`` zero, so the residual is the kernel itself."""
    kernel = _float32_kernel(kernel)
    _check_ranks([rank], min(kernel.shape), kernel.shape)
    bound = 1.0 / np.sqrt(kernel.shape[0])
    a = np.random.default_rng(seed).uniform(-bound, bound, (kernel.shape[0], rank))
    b = np.zeros((rank, kernel.shape[1]), np.float32)
    return kernel, {"lora": (a.astype(np.float32), b)}, alpha / rank


# Uniform signature of the registry: (kernel, ranks by adapter name, alpha, seed) -> InitResult.
InitFn = Callable[[np.ndarray, Mapping[str, int], float, int], InitResult]


@dataclasses.dataclass(frozen=True)
class InitMethod:
    """A named initialisation and the adapter names it creates (the keys its ranks need)."""

    fn: InitFn
    adapter_names: tuple[str, ...]


def _single(fn: Callable[..., InitResult], name: str) -> InitFn:
    return lambda kernel, ranks, alpha, seed: fn(kernel, ranks[name], alpha)


INIT_METHODS: dict[str, InitMethod] = {
    "recyclelora": InitMethod(
        lambda k, ranks, alpha, seed: recyclelora(k, ranks["main"], ranks["sub"], alpha),
        ("main", "sub"),
    ),
    "swapped": InitMethod(
        lambda k, ranks, alpha, seed: recyclelora_swapped(k, ranks["main"], ranks["sub"], alpha),
        ("main", "sub"),
    ),
    "main-only": InitMethod(
        _single(lambda k, r, alpha: _rrqr_init(k, [("main", r, True)], alpha), "main"), ("main",)
    ),
    "sub-only": InitMethod(
        _single(lambda k, r, alpha: _rrqr_init(k, [("sub", r, False)], alpha), "sub"), ("sub",)
    ),
    # SoMA and MiLoRA share the minor-SVD formula; they differ in recipe (blocks, ranks, what
    # trains), which the attach and label rules express.
    "soma": InitMethod(
        _single(lambda k, r, alpha: _svd_init(k, r, alpha, minor=True), "lora"), ("lora",)
    ),
    "milora": InitMethod(
        _single(lambda k, r, alpha: _svd_init(k, r, alpha, minor=True), "lora"), ("lora",)
    ),
    "pissa": InitMethod(
        _single(lambda k, r, alpha: _svd_init(k, r, alpha, minor=False), "lora"), ("lora",)
    ),
    "lora": InitMethod(
        lambda k, ranks, alpha, seed: lora(k, ranks["lora"], alpha, seed), ("lora",)
    ),
}


def get_init(name: str) -> InitMethod:
    """The registered method ``name``; the error lists the known names."""
    if name not in INIT_METHODS:
        raise KeyError(f"unknown init method {name!r}; known: {sorted(INIT_METHODS)}")
    return INIT_METHODS[name]


def run_init(
    name: str, kernel: np.ndarray, ranks: Mapping[str, int], alpha: float, seed: int = 0
) -> InitResult:
    """Initialise one kernel with method ``name``, checking ``ranks`` names its adapters."""
    method = get_init(name)
    if set(ranks) != set(method.adapter_names):
        raise ValueError(
            f"init {name!r} creates adapters {list(method.adapter_names)}, "
            f"but ranks name {sorted(ranks)}"
        )
    return method.fn(kernel, ranks, alpha, seed)
