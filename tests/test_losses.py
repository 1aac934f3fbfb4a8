"""Matching against scipy and the set loss against transformers' ``Mask2FormerLoss``."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from transformers.models.mask2former import modeling_mask2former as hf

from recyclelora_jax.heads import HEADS, head_spec
from recyclelora_jax.losses import (
    LossConfig,
    hungarian_match,
    mask2former_loss,
    pixel_cross_entropy,
    set_loss_terms,
)
from recyclelora_jax.losses.mask2former_loss import (
    corner_classes,
    label_points,
    most_uncertain,
    present_classes,
    sample_loss_points,
)

K, Q = 5, 12
CFG = LossConfig(num_classes=K, num_points=40)


@pytest.mark.parametrize("k", [1, 7, 19])
def test_matching_equals_scipy(k):
    rng = np.random.default_rng(k)
    cost = rng.normal(size=(4, 100, k)).astype(np.float32)
    valid = rng.random((4, k)) < 0.7
    valid[:, 0] = True
    got = np.asarray(jax.jit(jax.vmap(hungarian_match))(jnp.asarray(cost), jnp.asarray(valid)))
    for b in range(4):
        cols = np.flatnonzero(valid[b])
        rows, sub = linear_sum_assignment(cost[b][:, cols])
        np.testing.assert_array_equal(got[b][cols[sub]], rows)
        assert len(set(got[b].tolist())) == k  # padded columns take distinct left-over rows


def _degenerate_costs(rng, q: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ties, NaN/inf entries (a whole query and a whole target among them), padded columns."""
    ties = rng.integers(0, 3, (q, k)).astype(np.float32)
    const = np.ones((q, k), np.float32)
    bad = rng.normal(size=(q, k)).astype(np.float32)
    bad[rng.random((q, k)) < 0.2] = np.nan
    bad[0] = np.inf
    bad[:, 1] = np.nan
    bad[2, 2] = -np.inf
    padded = rng.integers(0, 4, (q, k)).astype(np.float32)
    valid = np.ones((4, k), bool)
    valid[3, 1::2] = False
    return np.stack([ties, const, bad, padded]), valid


@pytest.mark.parametrize("q, k", [(12, 7), (8, 8)])
def test_matching_optimal_on_degenerate_costs(q, k):
    """Same total cost as scipy (NaN/inf read as +-1e8, scipy's own choice among ties may
    differ) and every target on its own query."""
    rng = np.random.default_rng(q)
    cases = [_degenerate_costs(rng, q, k) for _ in range(4)]
    cost, valid = (np.concatenate(x) for x in zip(*cases, strict=True))
    got = np.asarray(jax.jit(jax.vmap(hungarian_match))(jnp.asarray(cost), jnp.asarray(valid)))
    for c, v, match in zip(cost, valid, got, strict=True):
        assert sorted(set(match.tolist())) == sorted(match.tolist()) and match.min() >= 0
        assert match.max() < q
        real = np.nan_to_num(c[:, v].astype(np.float64), nan=1e8, posinf=1e8, neginf=-1e8)
        rows, cols = linear_sum_assignment(real)
        want = real[rows, cols].sum()
        np.testing.assert_allclose(real[match[v], np.arange(v.sum())].sum(), want, rtol=1e-6)


def _labels(rng, b=2, h=24, w=20):
    """Random blocky labels with ignore pixels; image 1 has a single class."""
    lab = rng.integers(0, K, size=(b, h // 4, w // 4)).repeat(4, 1).repeat(4, 2)
    lab[rng.random(lab.shape) < 0.1] = 255
    lab[1] = np.where(lab[1] == 255, 255, 3)
    return lab.astype(np.int32)


@pytest.mark.parametrize("sampling", ["gather", "matmul"])
def test_set_loss_matches_transformers(monkeypatch, sampling):
    """Same points injected into the reference (torch.rand patched) -> same three terms."""
    cfg = dataclasses.replace(CFG, sampling=sampling)
    rng = np.random.default_rng(0)
    b = 2
    cls = rng.normal(size=(b, Q, K + 1)).astype(np.float32)
    masks = rng.normal(size=(b, Q, 6, 5)).astype(np.float32) * 3
    labels = _labels(rng, b)
    points = sample_loss_points(jax.random.key(1), b, CFG)
    match_pts, over_pts, rand_pts = (
        np.ascontiguousarray(np.moveaxis(np.asarray(x), 0, -1)) for x in points
    )
    present = [np.unique(lab[lab != 255]) for lab in labels]
    mask_labels = [
        torch.from_numpy((lab[None] == c[:, None, None]).astype(np.float32))
        for lab, c in zip(labels, present, strict=True)
    ]
    class_labels = [torch.from_numpy(c).long() for c in present]
    config = hf.Mask2FormerConfig(num_labels=K, train_num_points=CFG.num_points)
    reference = hf.Mask2FormerLoss(config, {"loss_cross_entropy": 2.0})
    inputs = dict(
        masks_queries_logits=torch.from_numpy(masks),
        class_queries_logits=torch.from_numpy(cls),
        mask_labels=mask_labels,
        class_labels=class_labels,
    )

    def feed(tensors):
        it = iter(tensors)
        monkeypatch.setattr(torch, "rand", lambda *a, **kw: torch.from_numpy(np.array(next(it))))

    feed([p[None] for p in match_pts])
    indices = reference.matcher(**inputs)
    # boxes in the reference's order: per image, by query; each box is (image, class) here
    boxes = [(i, int(present[i][t])) for i, (_, tgt) in enumerate(indices) for t in tgt]
    feed(
        [p[None] for p in match_pts]
        + [
            np.stack([over_pts[i, c] for i, c in boxes]),
            np.stack([rand_pts[i, c] for i, c in boxes]),
        ]
    )
    with torch.no_grad():
        want = reference(**inputs)
    got = jax.jit(set_loss_terms, static_argnums=6)(
        jnp.asarray(cls), jnp.asarray(masks), jnp.asarray(labels), *points, cfg
    )
    for ours, theirs in (
        ("class", "loss_cross_entropy"),
        ("mask", "loss_mask"),
        ("dice", "loss_dice"),
    ):
        np.testing.assert_allclose(got[ours], want[theirs].item(), rtol=1e-4, atol=1e-5)


def _outputs(rng, b, sets=3):
    return {
        "pred_logits": jnp.asarray(rng.normal(size=(b, Q, K + 1)), jnp.float32),
        "pred_masks": jnp.asarray(rng.normal(size=(b, Q, 6, 5)), jnp.float32),
        "aux_logits": jnp.asarray(rng.normal(size=(sets - 1, b, Q, K + 1)), jnp.float32),
        "aux_masks": jnp.asarray(rng.normal(size=(sets - 1, b, Q, 6, 5)), jnp.float32),
    }


def test_loss_finite_on_degenerate_labels():
    """Ignore pixels, single-class images, images with no valid pixel: finite loss and grads."""
    rng = np.random.default_rng(2)
    labels = _labels(rng, 3)
    labels[2] = 255  # no valid pixel at all
    outputs = _outputs(rng, 3)
    step = jax.jit(
        jax.value_and_grad(
            lambda o, lab: mask2former_loss(o, lab, jax.random.key(0), CFG), has_aux=True
        )
    )
    for lab in (labels, np.full_like(labels, 255)):
        (loss, terms), grads = step(outputs, lab)
        assert np.isfinite(loss) and all(np.isfinite(v) for v in terms.values())
        assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
        np.testing.assert_allclose(loss, sum(terms.values()), rtol=1e-6)
    assert float(terms["mask"]) == 0.0 and float(terms["class"]) > 0.0  # all-ignore batch


def test_loss_sums_all_sets():
    """The total is the weighted sum of each set's terms (final set included)."""
    rng = np.random.default_rng(3)
    labels = jnp.asarray(_labels(rng))
    outputs = _outputs(rng, 2, sets=2)
    _, terms = jax.jit(mask2former_loss, static_argnums=3)(outputs, labels, jax.random.key(5), CFG)
    keys = jax.random.split(jax.random.key(5), 2)
    sets = [
        (outputs["aux_logits"][0], outputs["aux_masks"][0]),
        (outputs["pred_logits"], outputs["pred_masks"]),
    ]
    one_set = jax.jit(
        lambda lg, mk, key: set_loss_terms(lg, mk, labels, *sample_loss_points(key, 2, CFG), CFG)
    )
    per_set = [one_set(lg, mk, key) for (lg, mk), key in zip(sets, keys, strict=True)]
    np.testing.assert_allclose(terms["dice"], 5.0 * sum(t["dice"] for t in per_set), rtol=1e-5)
    np.testing.assert_allclose(terms["class"], 2.0 * sum(t["class"] for t in per_set), rtol=1e-5)


def test_matmul_sampling_gives_the_gather_loss_and_gradients():
    """The TPU layout (interpolation-weight matmuls) against today's gathers, float32."""
    rng = np.random.default_rng(6)
    labels = jnp.asarray(_labels(rng))
    outputs = _outputs(rng, 2)

    def run(sampling):
        cfg = dataclasses.replace(CFG, sampling=sampling)
        fn = lambda o: mask2former_loss(o, labels, jax.random.key(2), cfg)[0]
        return jax.jit(jax.value_and_grad(fn))(outputs)

    (loss0, g0), (loss1, g1) = run("gather"), run("matmul")
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    for name, a in g0.items():
        scale = float(jnp.abs(a).max())
        np.testing.assert_allclose(g1[name], a, rtol=0, atol=1e-5 * scale, err_msg=name)


def test_label_points_are_grid_sample_of_the_binary_masks():
    """One int8 code per point (``corner_classes``) against torch's ``grid_sample`` of each
    ``label == k`` mask (align_corners=False, zero padding), for per-class and shared points,
    points beyond the border included; ignore pixels and ids >= K are no class."""
    rng = np.random.default_rng(7)
    labels = _labels(rng, 2, 12, 8)
    labels[0, 0, :3] = 40
    codes = corner_classes(jnp.asarray(labels), K)
    assert codes.dtype == jnp.int8 and codes.shape == (2, K, 13, 9)
    x, y = (rng.uniform(-0.2, 1.2, (K, 300)).astype(np.float32) for _ in range(2))
    x[:, :3], y[:, :3] = [0.0, 1.0, 0.5], [1.0, 0.0, 0.5]  # corners and the centre
    for lab, code in zip(labels, codes, strict=True):
        masks = torch.from_numpy((lab[None] == np.arange(K)[:, None, None]).astype(np.float32))
        grid = torch.from_numpy(np.stack([x, y], -1) * 2 - 1)[:, None]  # (K, 1, P, 2)
        want = torch.nn.functional.grid_sample(masks[:, None], grid, align_corners=False)
        want = want[:, 0, 0].numpy()
        np.testing.assert_allclose(
            label_points(code, jnp.asarray(x), jnp.asarray(y)), want, atol=1e-6
        )
        shared = label_points(code, jnp.asarray(x[0]), jnp.asarray(y[0]))
        grid0 = torch.from_numpy(np.stack([x[0], y[0]], -1) * 2 - 1)[None, None].expand(K, 1, -1, 2)
        want0 = torch.nn.functional.grid_sample(masks[:, None], grid0, align_corners=False)
        np.testing.assert_allclose(shared, want0[:, 0, 0].numpy(), atol=1e-6)


def test_sort_selects_the_top_k_points():
    """The TPU form (a stable sort carrying the coordinates) picks the same points, in the same
    order, as ``lax.top_k`` and a gather, ties (a few distinct values) included."""
    rng = np.random.default_rng(8)
    u = jnp.asarray(-rng.integers(0, 6, (3, K, 301)).astype(np.float32))
    u = u.at[0, 0].set(-jnp.abs(jnp.asarray(rng.normal(size=301), jnp.float32)))
    x, y = (jnp.asarray(rng.random((3, K, 301)), jnp.float32) for _ in range(2))
    want = most_uncertain(u, x, y, 100, sort=False)
    got = jax.jit(most_uncertain, static_argnums=(3, 4))(u, x, y, 100, True)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def _primitives(jaxpr) -> list:
    """Every equation of a jaxpr and of the jaxprs inside it (maps, scans, remat, pjit)."""
    out = []
    for eqn in jaxpr.eqns:
        out.append(eqn)
        for v in eqn.params.values():
            for sub in v if isinstance(v, tuple | list) else (v,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    out += _primitives(sub)
    return out


@pytest.mark.parametrize("sampling", ["gather", "matmul"])
def test_loss_reads_no_label_and_no_coordinate_by_index(sampling):
    """What the TPU forms removed, in the traced loss and its gradient: no gather from the int32
    label map (codes are int8), and with ``matmul`` no top-k and no gather of the oversampled
    coordinates (a sort carries them)."""
    cfg = dataclasses.replace(CFG, sampling=sampling)
    labels = jnp.asarray(_labels(np.random.default_rng(9)))
    outputs = _outputs(np.random.default_rng(9), 2)
    fn = jax.grad(lambda o: mask2former_loss(o, labels, jax.random.key(0), cfg)[0])
    eqns = _primitives(jax.make_jaxpr(fn)(outputs).jaxpr)
    gathers = [e for e in eqns if e.primitive.name == "gather"]
    assert gathers and not [e for e in gathers if e.invars[0].aval.dtype == jnp.int32]
    assert any(e.invars[0].aval.dtype == jnp.int8 for e in gathers)
    over = [e for e in gathers if e.invars[0].aval.shape[-1] == cfg.num_oversampled]
    top_k = [e for e in eqns if e.primitive.name == "top_k"]
    if sampling == "matmul":
        assert not over and not top_k and any(e.primitive.name == "sort" for e in eqns)
    else:
        assert over and top_k


def test_present_classes():
    """By hand, then against the bincount of each clipped map that it replaces, on random maps
    with ignored pixels, other ids and classes absent."""
    labels = jnp.asarray([[[0, 255], [4, 7]], [[255, 255], [255, 255]]])
    np.testing.assert_array_equal(present_classes(labels, K), [[1, 0, 0, 0, 1], [0, 0, 0, 0, 0]])
    rng = np.random.default_rng(5)
    maps = rng.choice([0, 2, 19, 25, 255], size=(6, 9, 7)).astype(np.int32)
    maps[1] = 255
    want = [np.bincount(np.clip(m.ravel(), 0, 19), minlength=20)[:19] > 0 for m in maps]
    np.testing.assert_array_equal(present_classes(jnp.asarray(maps), 19), np.stack(want))


def test_pixel_cross_entropy_matches_torch():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(2, 6, 5, K)).astype(np.float32)
    labels = _labels(rng)
    up = torch.nn.functional.interpolate(
        torch.from_numpy(logits).permute(0, 3, 1, 2),
        size=labels.shape[1:],
        mode="bilinear",
        align_corners=False,
    )
    want = torch.nn.functional.cross_entropy(up, torch.from_numpy(labels).long(), ignore_index=255)
    loss_fn = jax.jit(lambda x, lab: HEADS["linear"].loss({"logits": x}, lab, None, CFG)[0])
    np.testing.assert_allclose(loss_fn(logits, labels), want.item(), rtol=1e-5)
    empty = jnp.full(labels.shape, 255)
    loss, grad = jax.jit(jax.value_and_grad(lambda x: pixel_cross_entropy(x, empty)[0]))(logits)
    assert float(loss) == 0.0 and np.isfinite(grad).all()


def test_bad_inputs_raise():
    for name, outputs in (("linear", {"logits": jnp.zeros(1)}), ("mask2former", {})):
        with pytest.raises(ValueError, match="labels must be"):
            head_spec(name).loss(outputs, jnp.zeros((2, 2), jnp.int32), None, CFG)
    with pytest.raises(ValueError, match="at least as many queries"):
        hungarian_match(jnp.zeros((2, 3)), jnp.ones(3, bool))
