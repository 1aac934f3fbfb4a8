"""Multi-scale deformable attention against transformers' PyTorch module (random weights)."""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.extend.core import jaxprs_in_params
from transformers.models.mask2former import modeling_mask2former as hf

from recyclelora_jax.models.msdeform import MultiScaleDeformableAttention, reference_points
from recyclelora_jax.models.sampling import (
    SAMPLINGS,
    axis_weights,
    bilinear_corners,
    resolve_sampling,
    sample_points,
)

SHAPES = ((8, 10), (4, 5), (2, 3))


def _linear(layer: torch.nn.Linear) -> dict:
    return {"kernel": layer.weight.detach().numpy().T, "bias": layer.bias.detach().numpy()}


def _random_reference(dim=32, heads=4, levels=3, points=4):
    torch.manual_seed(0)
    ref = hf.Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention(dim, heads, levels, points)
    with torch.no_grad():  # large offsets: many sampling points fall outside the maps
        for p in ref.parameters():
            p.normal_(0.0, 0.5)
    names = ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
    params = {n: _linear(getattr(ref, n)) for n in names}
    return ref, params


def test_grid_sample_parity():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(3, 7, 5)).astype(np.float32)
    pts = rng.uniform(-0.2, 1.2, size=(3, 50, 2)).astype(np.float32)
    want = torch.nn.functional.grid_sample(
        torch.from_numpy(maps)[:, None],
        torch.from_numpy(2 * pts - 1)[:, :, None],
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )[:, 0, :, 0]
    got = sample_points(jnp.asarray(maps), jnp.asarray(pts[..., 0]), jnp.asarray(pts[..., 1]))
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_corner_weights_zero_outside():
    idx, wts = bilinear_corners(jnp.asarray([0.0, 1.0]), jnp.asarray([0.0, 1.0]), 4, 4)
    # pixel (-0.5, -0.5): only the (0, 0) corner is inside, with weight 0.25
    np.testing.assert_allclose(wts[:, 0], [0, 0, 0, 0.25])
    assert int(idx[3, 0]) == 0 and int(idx[:, 1].max()) <= 15


def test_axis_weights_are_the_corner_weights_and_their_gradient():
    """x weights times y weights = the four corner weights scattered to their indices."""
    rng = np.random.default_rng(2)
    pts = jnp.asarray(rng.uniform(-0.3, 1.3, size=(2, 40)).astype(np.float32))
    pts = pts.at[:, :4].set(jnp.asarray([[0.5 / 5, 0.0, 1.0, 0.3], [0.5 / 3, 0.0, 1.0, 1 / 3]]))
    h, w = 3, 5

    def dense(p):
        return axis_weights(p[1], h)[:, :, None] * axis_weights(p[0], w)[:, None, :]

    def corners(p):
        idx, wts = bilinear_corners(p[0], p[1], h, w)
        rows = jnp.broadcast_to(jnp.arange(p.shape[1]), idx.shape)
        return jnp.zeros((p.shape[1], h * w)).at[rows, idx].add(wts).reshape(-1, h, w)

    np.testing.assert_allclose(dense(pts), corners(pts), atol=1e-7)
    cot = jnp.asarray(rng.normal(size=(40, h, w)).astype(np.float32))
    grad = lambda f: jax.grad(lambda p: (f(p) * cot).sum())(pts)
    np.testing.assert_allclose(grad(dense), grad(corners), atol=1e-6)


def test_sampling_resolves_by_backend():
    assert resolve_sampling("auto", "cpu") == resolve_sampling("auto", "gpu") == "gather"
    assert resolve_sampling("auto", "tpu") == "matmul"
    with pytest.raises(ValueError, match="use auto or one of"):
        resolve_sampling("dense", "cpu")


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_deformable_attention_parity(sampling):
    """Output and every gradient (parameters, queries, values) against PyTorch autograd."""
    ref, params = _random_reference()
    b, s = 2, sum(h * w for h, w in SHAPES)
    rng = np.random.default_rng(1)
    hidden, pos, cot = (rng.normal(size=(b, s, 32)).astype(np.float32) for _ in range(3))
    refs = np.array(reference_points(SHAPES))
    hidden_t = torch.from_numpy(hidden).requires_grad_()
    want = ref(
        hidden_states=hidden_t,
        encoder_hidden_states=hidden_t,
        position_embeddings=torch.from_numpy(pos),
        reference_points=torch.from_numpy(refs)[None, :, None].expand(b, s, 3, 2),
        spatial_shapes_list=list(SHAPES),
    )[0]
    (want * torch.from_numpy(cot)).sum().backward()
    module = MultiScaleDeformableAttention(num_heads=4, sampling=sampling)

    def apply(p, x):
        return module.apply({"params": p}, x + pos, refs[None], x, SHAPES)

    @jax.jit  # as the training step runs it (eager, every op is dispatched alone)
    def output_and_gradients(p, x, cot):
        out, vjp = jax.vjp(apply, p, x)
        return out, vjp(cot)

    got, (grad_params, grad_hidden) = output_and_gradients(
        params, jnp.asarray(hidden), jnp.asarray(cot)
    )
    np.testing.assert_allclose(got, want.detach().numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(grad_hidden, hidden_t.grad.numpy(), atol=1e-4, rtol=1e-4)
    for name, g in grad_params.items():
        layer = getattr(ref, name)
        np.testing.assert_allclose(g["kernel"], layer.weight.grad.numpy().T, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(g["bias"], layer.bias.grad.numpy(), atol=1e-4, rtol=1e-4)


def test_reference_init():
    """Offsets/attention init equals transformers' `_init_weights` for this module."""
    ref = hf.Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention(32, 4, 3, 4)
    owner = types.SimpleNamespace(config=hf.Mask2FormerConfig())
    hf.Mask2FormerPreTrainedModel._init_weights(owner, ref)
    x = jnp.zeros((1, 6, 32))
    params = MultiScaleDeformableAttention(num_heads=4).init(
        jax.random.key(0), x, jnp.zeros((1, 6, 2)), x, ((2, 1), (2, 1), (2, 1))
    )["params"]
    for name in ("sampling_offsets", "attention_weights"):
        want = _linear(getattr(ref, name))
        np.testing.assert_allclose(params[name]["kernel"], want["kernel"])
        np.testing.assert_allclose(params[name]["bias"], want["bias"], atol=1e-6)
    bound = math.sqrt(6 / 64)  # xavier uniform for 32 -> 32
    assert float(jnp.abs(params["value_proj"]["kernel"]).max()) <= bound


@pytest.mark.parametrize(("sampling", "remat"), [("gather", True), ("matmul", False)])
def test_gradients_agree_and_no_dense_offsets_grid(sampling, remat):
    """Both samplings and remat give today's (gather) gradients to 1e-5 of each leaf's largest
    entry in float32; neither builds a (B, Q, heads, L, P, H*W)-sized array in forward+backward
    (the matmul's per-level (B, heads, Q, P, h, w) product, summed over points straight away,
    is one level's share: the TPU compiler fuses it into the matmul)."""
    _, params = _random_reference()
    b, s = 2, sum(h * w for h, w in SHAPES)
    x = jax.random.normal(jax.random.key(0), (b, s, 32))
    refs = reference_points(SHAPES)[None]

    def loss(p, sampling, remat):
        module = MultiScaleDeformableAttention(num_heads=4, remat=remat, sampling=sampling)
        return (module.apply({"params": p}, x, refs, x, SHAPES) ** 2).sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss), static_argnums=(1, 2))(params, sampling, remat)
    biggest = max(
        math.prod(v.aval.shape) for e in _all_eqns(jaxpr.jaxpr) for v in e.outvars if v.aval.shape
    )
    dense = b * s * 4 * 3 * 4 * max(h * w for h, w in SHAPES)
    assert biggest * len(SHAPES) <= dense, (biggest, dense)
    g0 = jax.grad(loss)(params, "gather", False)
    g1 = jax.grad(loss)(params, sampling, remat)
    for a, c in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(c, a, rtol=0, atol=1e-5 * float(jnp.abs(a).max()))


def _all_eqns(jaxpr):
    """Every equation, recursing into pjit / checkpoint / custom-vjp sub-jaxprs."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jaxprs_in_params(eqn.params):
            yield from _all_eqns(sub)
