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
from recyclelora_jax.models.sampling import bilinear_corners, sample_points

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
    np.testing.assert_allclose(sample_points(jnp.asarray(maps), jnp.asarray(pts)), want, atol=1e-6)


def test_corner_weights_zero_outside():
    idx, wts = bilinear_corners(jnp.asarray([[0.0, 0.0], [1.0, 1.0]]), 4, 4)
    # pixel (-0.5, -0.5): only the (0, 0) corner is inside, with weight 0.25
    np.testing.assert_allclose(wts[0], [0, 0, 0, 0.25])
    assert int(idx[0, 3]) == 0 and int(idx[1].max()) <= 15


def test_deformable_attention_parity():
    ref, params = _random_reference()
    b, s = 2, sum(h * w for h, w in SHAPES)
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(b, s, 32)).astype(np.float32)
    pos = rng.normal(size=(b, s, 32)).astype(np.float32)
    refs = np.array(reference_points(SHAPES))
    with torch.no_grad():
        want = ref(
            hidden_states=torch.from_numpy(hidden),
            encoder_hidden_states=torch.from_numpy(hidden),
            position_embeddings=torch.from_numpy(pos),
            reference_points=torch.from_numpy(refs)[None, :, None].expand(b, s, 3, 2),
            spatial_shapes_list=list(SHAPES),
        )[0].numpy()
    module = MultiScaleDeformableAttention(num_heads=4)
    got = module.apply(
        {"params": params}, jnp.asarray(hidden + pos), refs[None], jnp.asarray(hidden), SHAPES
    )
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


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


@pytest.mark.parametrize("remat", [False, True])
def test_no_dense_sampling_intermediates(remat):
    """Forward+backward never builds a (B, Q, heads, L, P, H*W)-sized array; remat agrees."""
    _, params = _random_reference()
    b, s = 2, sum(h * w for h, w in SHAPES)
    x = jax.random.normal(jax.random.key(0), (b, s, 32))
    refs = reference_points(SHAPES)[None]

    def loss(p, remat_flag):
        out = MultiScaleDeformableAttention(num_heads=4, remat=remat_flag).apply(
            {"params": p}, x, refs, x, SHAPES
        )
        return (out**2).sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params, remat)
    biggest = max(
        math.prod(v.aval.shape) for e in _all_eqns(jaxpr.jaxpr) for v in e.outvars if v.aval.shape
    )
    dense = b * s * 4 * 3 * 4 * max(h * w for h, w in SHAPES)
    assert biggest * 4 <= dense, (biggest, dense)
    g0, g1 = jax.grad(loss, argnums=0)(params, False), jax.grad(loss)(params, remat)
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5), g0, g1)


def _all_eqns(jaxpr):
    """Every equation, recursing into pjit / checkpoint / custom-vjp sub-jaxprs."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jaxprs_in_params(eqn.params):
            yield from _all_eqns(sub)
