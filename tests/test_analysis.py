"""Analyses: closed forms for effective rank and Grassmann distance, and the CLI end to end."""

import json
import math

import jax
import numpy as np
import pytest
import scipy.linalg
from _torch_dinov2 import reference_model, save_hub

from recyclelora_jax import analysis
from recyclelora_jax.convert import load_dinov2
from recyclelora_jax.model_io import save_tree
from recyclelora_jax.models.dinov2 import ARCHS
from recyclelora_jax.peft.params import AttachRule, attach

TINY = ARCHS["tiny"]


def _orthonormal(rng, n, k):
    return np.linalg.qr(rng.standard_normal((n, k)))[0]


def test_effective_rank_of_known_singular_values():
    rng = np.random.default_rng(0)
    sv = np.array([5.0, 3.0, 1.0, 0.5, 0.0, 0.0])
    a = _orthonormal(rng, 40, 6) * sv  # (in, r): a @ b has exactly the singular values sv
    b = _orthonormal(rng, 30, 6).T
    p = sv[:4] / sv.sum()
    closed = math.exp(-sum(pi * math.log(pi) for pi in p))
    np.testing.assert_allclose(analysis.update_singular_values(a, b), sv, atol=1e-12)
    assert analysis.effective_rank(analysis.update_singular_values(a, b)) == pytest.approx(closed)
    assert analysis.effective_rank(np.ones(7)) == pytest.approx(7.0)
    assert analysis.effective_rank(np.zeros(3)) == 0.0


def test_grassmann_distance_closed_forms():
    rng = np.random.default_rng(1)
    q = _orthonormal(rng, 50, 12)
    u = q[:, :4]
    assert analysis.grassmann_distance(u, u @ rng.standard_normal((4, 4))) == pytest.approx(
        0.0, abs=1e-6
    )  # same subspace, another basis
    assert analysis.grassmann_distance(u, q[:, 4:8]) == pytest.approx(math.pi / 2 * 2)
    assert analysis.grassmann_distance(q[:, :8], q[:, 8:]) == pytest.approx(math.pi / 2 * 2)
    # One shared direction, one at a known angle: sqrt(0^2 + theta^2).
    theta = 0.3
    v = np.stack([q[:, 0], math.cos(theta) * q[:, 1] + math.sin(theta) * q[:, 2]], axis=1)
    assert analysis.grassmann_distance(q[:, :2], v) == pytest.approx(theta)
    # Against scipy's principal angles.
    x, y = rng.standard_normal((50, 5)), rng.standard_normal((50, 3))
    ref = np.linalg.norm(scipy.linalg.subspace_angles(x, y))
    assert analysis.grassmann_distance(x, y) == pytest.approx(ref)


def test_cosine_similarity_and_column_norm_ratio():
    sim = analysis.cosine_similarity(np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]))
    np.testing.assert_allclose(sim[:2, :2], [[1, 2**-0.5], [2**-0.5, 1]])
    assert np.isnan(sim[2]).all()
    update = np.ones((6, 3))
    update[[1, 4]] *= 3.0
    assert analysis.init_column_norm_ratio(update, np.array([1, 4])) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="need chosen and other columns"):
        analysis.init_column_norm_ratio(update, np.arange(6))


def test_cli_compares_inits_and_analyses_a_trained_tree(tmp_path):
    """The CLI on a DINOv2 checkpoint file (3 blocks of width 128), nothing mocked."""
    checkpoint = save_hub(reference_model(), tmp_path / "hub")
    model, backbone = load_dinov2(checkpoint)
    rule = AttachRule("", "recyclelora", (("main", 8), ("sub", 2)))
    init, layout = attach(backbone, model.arch, [rule], progress=False)
    # A "trained" tree: the main update grows 2x faster at the pivot rows chosen at init.
    trained = jax.tree.map(np.asarray, init)
    for path, _ in layout:
        pair = analysis._layer(trained, path)["adapter_main"]
        rows = np.flatnonzero(pair["a"].sum(1))
        step = np.random.default_rng(len(path)).standard_normal(pair["a"].shape) * 0.01
        step[rows] *= 2.0
        pair["a"] = pair["a"] + step
    save_tree(tmp_path / "trained.safetensors", trained)
    out = tmp_path / "out"
    args = ["--out", str(out), "--checkpoint", str(checkpoint), "--r-main", "8", "--r-sub", "2"]
    args += ["--rank", "4", "--lora-alpha", "4"]
    args += ["--trained", str(tmp_path / "trained.safetensors")]
    summary = analysis.main(args)
    assert json.loads((out / "summary.json").read_text()) == summary
    for name in ("sim_recyclelora", "sim_soma", "sim_lora", "sim_trained", "grassmann"):
        assert (out / f"{name}.png").stat().st_size > 10_000
    rrqr = summary["init"]["recyclelora"]["layers"]["blocks_2/mlp/fc2"]
    # At init B@A has singular values all 1 (orthonormal Q columns, one-hot A): eff. rank = r,
    # and main and sub take orthogonal Q columns: distance (pi/2) sqrt(r_sub).
    assert rrqr["main"]["effective_rank"] == pytest.approx(8.0)
    assert rrqr["sub"]["rank_efficiency"] == pytest.approx(1.0)
    assert rrqr["grassmann_b"] == pytest.approx(math.pi / 2 * math.sqrt(2), abs=1e-5)
    assert summary["init"]["lora"]["by_type"]["qkv"]["lora"]["effective_rank"] == 0.0  # b = 0
    assert 0 < summary["init"]["soma"]["by_type"]["fc1"]["lora"]["rank_efficiency"] <= 1
    ratio = summary["trained"]["init_column_norm_ratio"]
    assert len(ratio["layers"]) == 12 and ratio["mean"] > 1.5
    assert summary["backbone"] == str(checkpoint)


def test_principal_components_against_numpy_svd_and_the_covariance():
    rng = np.random.default_rng(3)
    # 200 points near a 3-d subspace of R^24, with an offset: PCA must centre them.
    x = rng.standard_normal((200, 3)) * [5.0, 3.0, 2.0] @ rng.standard_normal((3, 24))
    x += 0.1 * rng.standard_normal((200, 24)) + 7.0
    components, projected, ratios = analysis.principal_components(x, 3)
    centred = x - x.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    signs = np.sign((components * vt[:3]).sum(1))
    np.testing.assert_allclose(components, signs[:, None] * vt[:3], atol=1e-12)
    np.testing.assert_allclose(projected, centred @ components.T, atol=1e-10)
    np.testing.assert_allclose(ratios, s[:3] ** 2 / (s**2).sum(), rtol=1e-12)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(x.T, bias=True))
    np.testing.assert_allclose(projected.var(0), eigenvalues[::-1][:3], rtol=1e-10)
    np.testing.assert_allclose(
        np.abs(components @ eigenvectors[:, ::-1][:, :3]), np.eye(3), atol=1e-8
    )
    pivot = np.abs(components).argmax(1)
    assert (components[np.arange(3), pivot] > 0).all()  # the documented sign convention
    rgb, _ = analysis.change_rgb(x.reshape(10, 20, 24))
    assert rgb.shape == (10, 20, 3) and rgb.min() == 0.0 and rgb.max() == 1.0


def test_feature_change_is_the_adapters_branch(tiny_backbone):
    """Removing the main adapter equals the backbone whose kernels hold only the residual and
    the sub adapter (merged independently with peft.params.merge)."""
    from recyclelora_jax.models.adapters import AdapterSpec
    from recyclelora_jax.models.dinov2 import DinoV2
    from recyclelora_jax.peft.params import merge

    backbone, images = tiny_backbone
    rule = AttachRule(r"(qkv|proj|fc1|fc2)$", "recyclelora", (("main", 8), ("sub", 2)))
    params, layout = attach(backbone, TINY, [rule], progress=False)
    params = jax.tree.map(np.asarray, params)
    rng = np.random.default_rng(4)
    for path, _ in layout:  # "training": move every adapter off its init
        for name in ("main", "sub"):
            pair = analysis._layer(params, path)[f"adapter_{name}"]
            pair["b"] = pair["b"] + 0.05 * rng.standard_normal(pair["b"].shape)
    model = DinoV2(TINY, out_indices=(1, 3), layerscale_init=1.0, adapters=layout)
    change = analysis.feature_change(model, params, images[:1], "main")
    sub_only = tuple((path, AdapterSpec((("sub", 2),), spec.scale)) for path, spec in layout)
    stripped = jax.tree.map(lambda x: x, params)
    for path, _ in layout:
        del analysis._layer(stripped, path)["adapter_main"]
    plain = DinoV2(TINY, out_indices=(1, 3), layerscale_init=1.0)
    without = plain.apply({"params": merge(stripped, sub_only)}, images[:1])["features"][-1][0]
    full = model.apply({"params": params}, images[:1])["features"][-1][0]
    np.testing.assert_allclose(change, np.asarray(full) - np.asarray(without), atol=2e-5)
    assert np.abs(change).max() > 1e-2  # the branch matters
