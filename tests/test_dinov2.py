"""DINOv2 backbone parity with `transformers` (PyTorch, random weights), imported by the project.

Tolerance: 1e-4 max-abs in float32 with highest matmul precision (conftest), on outputs of
magnitude ~1 after 3 random blocks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from _torch_dinov2 import reference_model, run_reference, save_hub, use_official_interpolation

from recyclelora_jax.convert import load_dinov2
from recyclelora_jax.models.adapters import AdaptedDense, AdapterSpec
from recyclelora_jax.models.dinov2 import (
    ARCHS,
    DinoV2,
    attention,
    gelu_exact,
    linear_layer_paths,
    linear_layer_shapes,
    standardize_image,
)

TOL = 1e-4
OUT = (0, 1)  # intermediate blocks compared, besides the final normed tokens
NATIVE, NON_NATIVE = (32, 32), (40, 24)  # 4x4 patch grid = the pretrained grid; 5x3 is not
SAME_COUNT = (16, 64)  # 2x8 = 16 patches, as many as the 4x4 grid, yet interpolated


def _images(hw, batch=2, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, *hw, 3)).astype(np.float32)


def _compare(model, params, ref, images, n_prefix):
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(images))
    last, hidden = run_reference(ref, images)
    tokens = np.concatenate(
        [
            np.asarray(out["x_norm_clstoken"])[:, None],
            np.asarray(out["x_norm_regtokens"]),
            np.asarray(out["x_norm_patchtokens"]),
        ],
        axis=1,
    )
    np.testing.assert_allclose(tokens, last, atol=TOL, rtol=0)
    b, h, w, _ = images.shape
    p = model.arch.patch_size
    for i, feat in zip(model.out_indices, out["features"], strict=True):
        assert feat.shape == (b, h // p, w // p, model.arch.embed_dim)
        want = hidden[i][:, n_prefix:].reshape(feat.shape)
        np.testing.assert_allclose(np.asarray(feat), want, atol=TOL, rtol=0)


@pytest.mark.parametrize(
    ("kind", "hw"),
    [
        ("plain", NATIVE),
        ("plain", NON_NATIVE),
        ("plain", SAME_COUNT),
        ("swiglu", NON_NATIVE),
        ("registers", NATIVE),
    ],
)
def test_matches_transformers_size_form(tmp_path, kind, hw):
    ref = reference_model(kind)
    model, params = load_dinov2(save_hub(ref, tmp_path), interpolate_offset=0.0, out_indices=OUT)
    assert model.arch.ffn == ("swiglu" if kind == "swiglu" else "mlp")
    _compare(model, params, ref, _images(hw), 1 + model.arch.num_register_tokens)


def test_registers_default_to_antialiased_size_form(tmp_path):
    """Dinov2WithRegisters interpolates with antialias=True; load_dinov2 picks that by itself."""
    ref = reference_model("registers")
    model, params = load_dinov2(save_hub(ref, tmp_path), out_indices=OUT)
    assert (model.interpolate_offset, model.interpolate_antialias) == (0.0, True)
    # 72x48 -> 9x6 grid: upsampling, where the antialiased kernel (a=-0.5) differs from a=-0.75.
    _compare(model, params, ref, _images((72, 48)), 5)


def test_official_offset_form(tmp_path):
    """Default (n + 0.1) / N rule vs the reference model patched to the official
    `F.interpolate(scale_factor=...)` call."""
    ref = reference_model("plain")
    model, params = load_dinov2(save_hub(ref, tmp_path), out_indices=OUT)
    assert model.interpolate_offset == 0.1
    use_official_interpolation(ref)
    _compare(model, params, ref, _images(NON_NATIVE), 1)


def test_mask_token_matches_bool_masked_pos(tmp_path):
    ref = reference_model("plain")
    model, params = load_dinov2(save_hub(ref, tmp_path), out_indices=OUT)
    images = _images(NATIVE)
    masks = np.random.default_rng(1).random((2, 16)) < 0.5
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(images), jnp.asarray(masks))
    with torch.no_grad():
        want = ref(
            torch.from_numpy(images).permute(0, 3, 1, 2), bool_masked_pos=torch.from_numpy(masks)
        ).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(out["x_norm_patchtokens"]), want[:, 1:], atol=TOL)


def test_remat_and_bfloat16_compute(tmp_path):
    model, params = load_dinov2(save_hub(reference_model(), tmp_path), out_indices=OUT)
    images = jnp.asarray(_images(NON_NATIVE))
    base = jax.jit(model.apply)({"params": params}, images)["x_norm_patchtokens"]

    def loss(x, m):
        return m.apply({"params": params}, x)["x_norm_patchtokens"].sum()

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    np.testing.assert_allclose(grad(images, model.clone(remat=True)), grad(images, model), atol=TOL)
    low = jax.jit(model.clone(dtype=jnp.bfloat16).apply)({"params": params}, images)
    low = low["x_norm_patchtokens"]
    assert low.dtype == jnp.bfloat16
    assert params["blocks_0"]["attn"]["qkv"]["kernel"].dtype == jnp.float32
    # bf16 keeps ~3 significant digits; 3 blocks of random weights stay within a few percent.
    assert float(jnp.abs(low.astype(jnp.float32) - base).mean()) < 0.05


def test_bfloat16_attention_is_float32_softmax():
    """bf16 q, k, v at 1024 tokens with peaked logits (std ~9) against float64 softmax attention
    of the same bf16 values: relative error 0.3 % with float32 logits and softmax statistics;
    logits or the normaliser in bf16 give 1.5 % (measured), so the bound is 0.6 %."""
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(3 * rng.standard_normal((1, 2, 1024, 32)), jnp.bfloat16) for _ in "qk")
    v = jnp.asarray(rng.standard_normal((1, 2, 1024, 32)), jnp.bfloat16)
    q64, k64, v64 = (np.asarray(x.astype(jnp.float32), np.float64) for x in (q, k, v))
    logits = q64 @ k64.swapaxes(-1, -2) / np.sqrt(32)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    want = (weights / weights.sum(-1, keepdims=True)) @ v64
    got = jax.jit(attention)(q, k, v)
    assert got.dtype == jnp.bfloat16
    got = np.asarray(got.astype(jnp.float32), np.float64)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 6e-3


def test_vit_l_tree_without_allocation_matches_transformers_count():
    arch = ARCHS["vitl14"]
    tree = jax.eval_shape(
        DinoV2(arch).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 518, 518, 3), jnp.float32)
    )["params"]
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))  # no arrays
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    config = transformers.Dinov2Config(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=518
    )
    with torch.device("meta"):
        theirs = sum(p.numel() for p in transformers.Dinov2Model(config).parameters())
    assert ours == theirs


def test_adapter_hook_places_adapters_and_rejects_unknown_layers():
    arch = ARCHS["tiny"]
    spec = AdapterSpec((("main", 4),), scale=1.0)
    images = jnp.zeros((1, 32, 32, 3))
    model = DinoV2(arch, out_indices=(0,), adapters=(("blocks_1/mlp/fc2", spec),))
    params = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    adapter = params["blocks_1"]["mlp"]["fc2"]["adapter_main"]
    assert (adapter["a"].shape, adapter["b"].shape) == ((512, 4), (4, 128))
    assert "adapter_main" not in params["blocks_0"]["mlp"]["fc2"]
    assert len(linear_layer_paths(arch)) == 4 * arch.depth
    for a in (arch, dataclasses.replace(arch, ffn="swiglu")):  # the shapes the FLOPs count reads
        init = DinoV2(a, out_indices=(0,)).init
        block = jax.eval_shape(init, jax.random.key(0), images)["params"]["blocks_0"]
        kernels = {p: block[p.split("/")[0]][p.split("/")[1]]["kernel"].shape
                   for p in linear_layer_shapes(a)}  # fmt: skip
        assert kernels == linear_layer_shapes(a), a.ffn
    bad = DinoV2(arch, out_indices=(0,), adapters=(("blocks_9/attn/qkv", spec),))
    with pytest.raises(ValueError, match="blocks_9/attn/qkv"):
        bad.init(jax.random.key(0), images)


@pytest.mark.parametrize(("dtype", "tol"), [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_adapted_dense_gradients_match_autodiff(dtype, tol):
    """The concatenated main+sub pair on 2-D (tokens, in) (``AdaptedDense``) against autodiff
    of the per-adapter formula ``x K + b + s sum_i (x a_i) b_i`` in the same compute
    dtype: output, input and every adapter gradient (relative max-abs; bf16 within its rounding),
    and the parameter tree keeps one ``adapter_<name>`` leaf pair per adapter."""
    spec = AdapterSpec((("main", 6), ("sub", 2)), scale=0.125)
    layer = AdaptedDense(24, spec, dtype=dtype)
    x = jax.random.normal(jax.random.key(0), (2, 7, 16))
    params = layer.init(jax.random.key(1), x)["params"]
    assert {
        k: jax.tree.map(jnp.shape, v) for k, v in params.items() if k.startswith("adapter")
    } == {
        "adapter_main": {"a": (16, 6), "b": (6, 24)},
        "adapter_sub": {"a": (16, 2), "b": (2, 24)},
    }
    keys = iter(jax.random.split(jax.random.key(2), 4))
    params = {  # nonzero adapters (the init leaves them to the PEFT method)
        k: jax.tree.map(lambda v: jax.random.normal(next(keys), v.shape), v)
        if k.startswith("adapter")
        else v
        for k, v in params.items()
    }
    cotangent = jax.random.normal(jax.random.key(3), (2, 7, 24))

    def reference(params, x):
        h = x.astype(dtype)
        y = h @ params["kernel"].astype(dtype) + params["bias"].astype(dtype)
        update = sum(
            (h @ params[f"adapter_{n}"]["a"].astype(dtype))
            @ params[f"adapter_{n}"]["b"].astype(dtype)
            for n, _ in spec.ranks
        )
        return y + (spec.scale * update).astype(dtype)

    out, pull = jax.vjp(lambda p, x: layer.apply({"params": p}, x), params, x)
    ref_out, ref_pull = jax.vjp(reference, params, x)
    assert out.dtype == ref_out.dtype == dtype
    got, want = pull(cotangent.astype(dtype)), ref_pull(cotangent.astype(dtype))
    for a, b in zip(jax.tree.leaves((out, got)), jax.tree.leaves((ref_out, want)), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= tol * np.abs(b).max(), a.shape


def test_image_input_norm_cancels_a_per_channel_colour_cast(tiny_backbone):
    """``input_norm="image"``: each image's channels standardised (numpy formula), so an affine
    colour cast per channel (gain and offset, as a change of white balance) changes nothing."""
    params, _ = tiny_backbone
    images = _images((32, 32), batch=2, seed=3)
    want = (images - images.mean((1, 2), keepdims=True)) / images.std((1, 2), keepdims=True)
    np.testing.assert_allclose(standardize_image(jnp.asarray(images)), want, atol=1e-5, rtol=0)
    flat = np.full((1, 8, 8, 3), 0.7, np.float32)
    flat_out = standardize_image(jnp.asarray(flat))  # std floored: rounding not blown up
    np.testing.assert_allclose(flat_out, 0.0, atol=1e-4, rtol=0)
    model = DinoV2(ARCHS["tiny"], out_indices=(1,), input_norm="image")
    cast = images * np.float32([0.5, 1.2, 0.8]) + np.float32([0.3, -0.2, 0.1])
    out, cast_out = (model.apply({"params": params}, jnp.asarray(x)) for x in (images, cast))
    np.testing.assert_allclose(out["features"][0], cast_out["features"][0], atol=1e-4, rtol=0)
    plain = model.clone(input_norm="dataset").apply({"params": params}, jnp.asarray(cast))
    assert not np.allclose(plain["features"][0], cast_out["features"][0], atol=1e-2)


def test_bad_inputs_are_named():
    model = DinoV2(ARCHS["tiny"], out_indices=(5,))
    with pytest.raises(ValueError, match=r"out_indices \[5\]"):
        model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="smaller than one 8px patch"):
        model.clone(out_indices=(0,)).init(jax.random.key(0), jnp.zeros((1, 4, 32, 3)))
    with pytest.raises(ValueError, match="input_norm must be 'dataset' or 'image', got 'pixel'"):
        model.clone(out_indices=(0,), input_norm="pixel").init(
            jax.random.key(0), jnp.zeros((1, 32, 32, 3))
        )


def test_attention_and_gelu_match_torch():
    """The CPU-friendly attention and erf-GELU against torch's SDPA and `F.gelu` directly."""
    rng = np.random.default_rng(0)
    q, k, v = (2 * rng.standard_normal((3, 2, 4, 50, 16))).astype(np.float32)
    want = torch.nn.functional.scaled_dot_product_attention(*map(torch.from_numpy, (q, k, v)))
    np.testing.assert_allclose(np.asarray(attention(q, k, v)), want.numpy(), atol=1e-5, rtol=0)
    x = (4 * rng.standard_normal(10_000)).astype(np.float32)
    want = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    got = np.asarray(gelu_exact(jnp.asarray(x)))
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)  # each ~1e-6 from float64 erf
