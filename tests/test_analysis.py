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
from recyclelora_jax.peft.params import AttachRule, attach, save_tree


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
    save_tree(trained, tmp_path / "trained.safetensors")
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
