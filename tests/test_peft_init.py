"""Adapter inits against direct re-implementations of RECIPE.md §2, §8 on scipy/torch
factorizations."""

import numpy as np
import pytest
import scipy.linalg
import torch
from threadpoolctl import threadpool_limits

from recyclelora_jax.peft.init import INIT_METHODS, get_init, recyclelora, run_init


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """OpenBLAS's threads spin on a shared 2-core host (docs/BENCHMARKS.md); as in `attach`."""
    with threadpool_limits(limits=1):
        yield


# Flax (in, out) kernels of ViT-L: qkv, proj, fc1, fc2 (fc2 is the wide W0 = 1024 x 4096).
VITL_KERNELS = [(1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024)]


def _reference_rrqr(w0: np.ndarray, r_main: int, r_sub: int, alpha: float):
    """RECIPE.md §2 verbatim on W0 (out, in) with scipy's pivoted QR."""
    q, _, p = scipy.linalg.qr(w0, pivoting=True, mode="economic")
    k = min(w0.shape)
    a_main = np.zeros((r_main, w0.shape[1]), np.float32)
    a_main[np.arange(r_main), p[k - r_main : k]] = 1.0
    a_sub = np.zeros((r_sub, w0.shape[1]), np.float32)
    a_sub[np.arange(r_sub), p[:r_sub]] = 1.0
    b_main, b_sub = q[:, k - r_main : k], q[:, :r_sub]
    s = np.float32(alpha / (r_main + r_sub))
    w_res = w0 - s * (b_main @ a_main + b_sub @ a_sub)
    return w_res, (a_main, b_main), (a_sub, b_sub), p


@pytest.mark.parametrize("shape", VITL_KERNELS)
def test_recyclelora_matches_scipy_reference(shape):
    kernel = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    residual, adapters, scale = recyclelora(kernel, 32, 4, alpha=1.0)
    w_res, (am, bm), (as_, bs), p = _reference_rrqr(kernel.T, 32, 4, 1.0)
    k = min(shape)
    assert scale == pytest.approx(1 / 36)
    for (a, b), ref_a, ref_b, pivots in (
        (adapters["main"], am, bm, p[k - 32 : k]),
        (adapters["sub"], as_, bs, p[:4]),
    ):
        assert a.shape == (shape[0], ref_a.shape[0]) and b.shape == (ref_b.shape[1], shape[1])
        np.testing.assert_array_equal(np.argmax(a, axis=0), pivots)  # identical pivots
        np.testing.assert_array_equal(a, ref_a.T)  # one-hot in exactly those rows
        np.testing.assert_allclose(b, ref_b.T, rtol=0, atol=1e-6)
    np.testing.assert_allclose(residual, w_res.T, rtol=0, atol=1e-6)
    # The contract of the outside checks: x @ a @ b == (B @ (A @ x.T)).T.
    x = np.random.default_rng(1).standard_normal((3, shape[0])).astype(np.float32)
    a, b = adapters["main"]
    np.testing.assert_allclose(x @ a @ b, (bm @ (am @ x.T)).T, rtol=0, atol=1e-5)


def test_ablations_take_the_documented_directions():
    kernel = np.random.default_rng(0).standard_normal((96, 64)).astype(np.float32)
    q, _, p = scipy.linalg.qr(kernel.T, pivoting=True, mode="economic")
    k = 64

    def check(ad, a_rows, q_cols):
        np.testing.assert_array_equal(np.argmax(ad[0], axis=0), p[a_rows])
        np.testing.assert_allclose(ad[1], q[:, q_cols].T, atol=1e-6)

    _, swapped, s = run_init("swapped", kernel, {"main": 8, "sub": 2}, 1.0)
    check(swapped["main"], slice(0, 8), slice(0, 8))
    check(swapped["sub"], slice(k - 2, k), slice(k - 2, k))
    assert s == pytest.approx(0.1)
    _, main_only, s = run_init("main-only", kernel, {"main": 8}, 1.0)
    check(main_only["main"], slice(k - 8, k), slice(k - 8, k))
    assert s == pytest.approx(1 / 8)
    _, sub_only, _ = run_init("sub-only", kernel, {"sub": 2}, 1.0)
    check(sub_only["sub"], slice(0, 2), slice(0, 2))


@pytest.mark.parametrize(("method", "minor"), [("soma", True), ("milora", True), ("pissa", False)])
def test_svd_inits_match_torch_formula(method, minor):
    kernel = np.random.default_rng(2).standard_normal((80, 48)).astype(np.float32)
    r, alpha = 6, 6.0
    residual, adapters, scale = run_init(method, kernel, {"lora": r}, alpha)
    # The reference in float64: torch's float32 SVD is itself 1.2e-5 off the exact PiSSA update
    # here (ours, float32 LAPACK through numpy, 3e-7), which made a 1e-5 bound a coin toss.
    u, sv, vh = torch.linalg.svd(torch.from_numpy(kernel.T.astype(np.float64)), full_matrices=False)
    idx = slice(len(sv) - r, len(sv)) if minor else slice(0, r)
    s = alpha / r
    big_b = u[:, idx] * torch.sqrt(sv[idx]) / s**0.5
    big_a = torch.sqrt(sv[idx])[:, None] * vh[idx] / s**0.5
    update = (s * big_b @ big_a).numpy()  # sign-invariant, unlike the factors
    a, b = adapters["lora"]
    assert scale == pytest.approx(s)
    np.testing.assert_allclose(scale * (a @ b), update.T, atol=1e-5)
    np.testing.assert_allclose(residual, kernel - update.T, atol=1e-5)
    np.testing.assert_allclose(residual + scale * (a @ b), kernel, atol=1e-5)
    # Factor by factor: sqrt(S_r / s) on each side, singular vectors orthonormal. A split that
    # leaves s * a @ b unchanged (all of S in one factor) fails here.
    want_sv = sv[idx].numpy()
    np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.sqrt(want_sv / s), rtol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), np.sqrt(want_sv / s), rtol=1e-4)
    unit_a, unit_b = a / np.linalg.norm(a, axis=0), b / np.linalg.norm(b, axis=1)[:, None]
    np.testing.assert_allclose(unit_a.T @ unit_a, np.eye(r), atol=1e-5)
    np.testing.assert_allclose(unit_b @ unit_b.T, np.eye(r), atol=1e-5)
    # The directions are the chosen singular vectors (up to sign): a = ±Vh_r.T, b = ±U_r.T.
    np.testing.assert_allclose(np.abs(unit_a.T @ vh[idx].numpy().T), np.eye(r), atol=1e-4)
    np.testing.assert_allclose(np.abs(unit_b @ u[:, idx].numpy()), np.eye(r), atol=1e-4)


def test_lora_is_kaiming_uniform_with_zero_b_and_seeded():
    kernel = np.random.default_rng(3).standard_normal((256, 32)).astype(np.float32)
    residual, adapters, scale = run_init("lora", kernel, {"lora": 8}, 16.0, seed=7)
    a, b = adapters["lora"]
    np.testing.assert_array_equal(residual, kernel)
    np.testing.assert_array_equal(b, 0.0)
    assert np.abs(a).max() <= 1 / 16 and np.abs(a).max() > 0.9 / 16
    assert scale == 2.0
    again = [run_init("lora", kernel, {"lora": 8}, 16.0, seed)[1]["lora"][0] for seed in (7, 8)]
    np.testing.assert_array_equal(a, again[0])
    assert not np.array_equal(a, again[1])


def test_registry_and_errors():
    assert set(INIT_METHODS) == {
        "recyclelora",
        "swapped",
        "main-only",
        "sub-only",
        "soma",
        "milora",
        "pissa",
        "lora",
    }
    with pytest.raises(KeyError, match="unknown init method 'qr'"):
        get_init("qr")
    kernel = np.zeros((16, 8), np.float32)
    with pytest.raises(ValueError, match=r"sum to at most min\(in, out\) = 8"):
        recyclelora(kernel, 6, 4)
    with pytest.raises(ValueError, match="creates adapters"):
        run_init("recyclelora", kernel, {"main": 2}, 1.0)
    with pytest.raises(ValueError, match="2-D"):
        recyclelora(np.zeros(4, np.float32), 1, 1)
