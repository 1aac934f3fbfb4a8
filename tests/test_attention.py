"""Every backbone attention implementation against the CPU reference (`dinov2.attention`), in
value and gradient; the Pallas TPU kernel runs in interpret mode here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from recyclelora_jax.models import dinov2
from recyclelora_jax.train.sharding import batch_sharding, make_mesh


def _qkv(tokens: int, heads: int = 2, head_dim: int = 16, batch: int = 2) -> jax.Array:
    return jax.random.normal(jax.random.key(tokens), (batch, tokens, 3, heads, head_dim))


def _value_and_grad(impl: str, qkv: jax.Array) -> tuple[jax.Array, jax.Array]:
    cotangent = jax.random.normal(jax.random.key(1), (*qkv.shape[:2], qkv.shape[3] * qkv.shape[4]))
    fn = lambda x: (dinov2.multi_head_attention(x, impl) * cotangent).sum()
    return dinov2.multi_head_attention(qkv, impl), jax.grad(fn)(qkv)


def _assert_matches_reference(impl: str, qkv: jax.Array) -> None:
    out, grad = _value_and_grad(impl, qkv)
    ref_out, ref_grad = _value_and_grad("reference", qkv)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-5)


def test_xla_matches_reference():
    _assert_matches_reference("xla", _qkv(37))


def test_pallas_flash_matches_reference_with_padded_tokens():
    # 37 tokens are padded to the kernel's 128-token block; the padding must stay invisible.
    with pltpu.force_tpu_interpret_mode():
        _assert_matches_reference("pallas", _qkv(37, batch=1))


def test_pallas_flash_in_a_sharded_step_matches_reference():
    """Under the training step's mesh (data 2 x fsdp 2 of the simulated CPU devices, batch split
    over both) the kernel runs per device in a shard_map: same value and gradient."""
    mesh = make_mesh(data=2, fsdp=2, devices=jax.devices()[:4])
    qkv = jax.device_put(_qkv(37, batch=4), batch_sharding(mesh))

    def in_mesh(impl):
        def fn(x):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                return _value_and_grad(impl, x)

        return jax.jit(fn)(qkv), str(jax.make_jaxpr(fn)(qkv))

    with pltpu.force_tpu_interpret_mode():
        (out, grad), program = in_mesh("pallas")
    assert "shard_map" in program and "pallas_call" in program
    (ref_out, ref_grad), _ = in_mesh("reference")
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-5)


def test_auto_picks_by_backend():
    resolve = dinov2.resolve_attention
    assert resolve("auto", "cpu", jnp.float32) == "reference"
    assert resolve("auto", "tpu", jnp.bfloat16) == "xla"
    assert resolve("auto", "gpu", jnp.bfloat16) == "cudnn"  # cuDNN flash takes 16-bit inputs
    assert resolve("auto", "gpu", jnp.float32) == "xla"
    assert resolve("pallas", "tpu", jnp.float32) == "pallas"
    with pytest.raises(ValueError, match="attention='flash' unknown"):
        resolve("flash", "cpu", jnp.float32)


def test_backbone_switch_changes_nothing_but_the_kernel(tiny_backbone):
    params, images = tiny_backbone
    ref = dinov2.DinoV2(dinov2.ARCHS["tiny"], out_indices=(0, 1, 2, 3), attention="reference")
    want = ref.apply({"params": params}, images)["features"]
    got = ref.clone(attention="xla").apply({"params": params}, images)["features"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
