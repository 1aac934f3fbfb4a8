"""``scan_layers``: the backbone blocks, the deformable encoder layers and the decoder's rounds
over the levels as one ``lax.scan`` each give the unrolled loop's outputs and gradients
(float32, 1e-5) over the same parameter tree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recyclelora_jax.config import TINY_MASK2FORMER, base_config, smoke
from recyclelora_jax.models.adapters import AdapterSpec
from recyclelora_jax.models.dinov2 import ARCHS, DinoV2, linear_layer_paths
from recyclelora_jax.models.layer_scan import uniform_runs
from recyclelora_jax.models.mask2former import Mask2FormerHead
from recyclelora_jax.train import trainer
from recyclelora_jax.train.sharding import make_mesh

TOL = 1e-5
TINY = ARCHS["tiny"]
RECYCLELORA = AdapterSpec((("main", 4), ("sub", 2)), 0.5)


@jax.jit
def _jitter(params, seed: int):
    """Random perturbation, so that zero-initialised adapters and layer scales carry gradient."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        tree,
        [
            x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
            for k, x in zip(keys, leaves, strict=True)
        ],
    )


def _value_and_grad(model, params, inputs, outputs):
    loss = lambda p: sum((y.astype(jnp.float32) ** 2).mean() for y in outputs(model, p, inputs))
    return jax.jit(jax.value_and_grad(loss))(params)


def _spec(x) -> tuple:
    return x.shape, x.dtype


def _assert_close(got, want):
    """Loss, then gradients, to ``TOL`` relative to the largest of them (some gradients are
    exactly zero in theory, e.g. key biases under a softmax, and only rounding noise here)."""
    for g_tree, w_tree in zip(got, want, strict=True):
        scale = max(float(np.abs(w).max()) for w in jax.tree.leaves(w_tree))
        for g, w in zip(jax.tree.leaves(g_tree), jax.tree.leaves(w_tree), strict=True):
            np.testing.assert_allclose(g, w, rtol=TOL, atol=TOL * scale)


def _scans(model, params, inputs) -> int:
    """The number of loops in the compiled-to-be program."""
    return str(jax.make_jaxpr(lambda p: model.apply({"params": p}, inputs))(params)).count("scan[")


def _backbone_outputs(model, params, images):
    out = model.apply({"params": params}, images)
    return [*out["features"], out["x_norm_clstoken"], out["x_norm_patchtokens"]]


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_blocks_match_the_loop_with_recyclelora_adapters(remat):
    """Blocks 1-3 adapted (main 4 + sub 2 on every kernel), block 0 plain, as SoMA leaves its
    first blocks: two scans, loss and every gradient as unrolled, with and without remat."""
    layout = tuple(
        (p, RECYCLELORA) for p in linear_layer_paths(TINY) if not p.startswith("blocks_0/")
    )
    loop = DinoV2(TINY, out_indices=(1, 3, 2), adapters=layout, remat=remat)
    scanned = loop.clone(scan_layers=True)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    params = jax.jit(loop.init)(jax.random.key(1), images)["params"]
    init_scanned = jax.eval_shape(scanned.init, jax.random.key(1), images)["params"]
    assert jax.tree.map(_spec, init_scanned) == jax.tree.map(_spec, params)
    params = _jitter(params, 2)
    assert _scans(scanned, params, images) == 2 and _scans(loop, params, images) == 0
    got = _value_and_grad(scanned, params, images, _backbone_outputs)
    _assert_close(got, _value_and_grad(loop, params, images, _backbone_outputs))
    assert float(jnp.abs(got[1]["blocks_2"]["attn"]["qkv"]["adapter_sub"]["a"]).max()) > 0


def test_uniform_runs_split_where_the_key_changes():
    assert uniform_runs("aabbba") == [slice(0, 2), slice(2, 5), slice(5, 6)]
    assert uniform_runs("a") == [slice(0, 1)]


def _head_outputs(model, params, features):
    return list(model.apply({"params": params}, features).values())


@pytest.mark.parametrize("remat_layers", [False, True])
@pytest.mark.parametrize(
    ("layers", "scans"), [(dict(encoder_layers=3), 1), (dict(decoder_layers=7), 2)]
)
def test_scanned_head_layers_match_the_loop(layers, scans, remat_layers):
    """The tiny Mask2Former with 3 deformable encoder layers (one scan) or 7 decoder layers
    (two rounds over the 3 levels as one scan, the 7th unrolled; the one encoder layer a scan
    too): every output set and every gradient as unrolled, same parameter tree."""
    loop = Mask2FormerHead(5, **dict(TINY_MASK2FORMER, **layers), remat_layers=remat_layers)
    scanned = loop.clone(scan_layers=True)
    keys = jax.random.split(jax.random.key(3), 4)
    features = [jax.random.normal(k, (2, 4, 4, 16)) for k in keys]
    params = jax.jit(loop.init)(jax.random.key(4), features)["params"]
    init_scanned = jax.eval_shape(scanned.init, jax.random.key(4), features)["params"]
    assert jax.tree.map(_spec, init_scanned) == jax.tree.map(_spec, params)
    params = _jitter(params, 5)
    assert _scans(scanned, params, features) == scans and _scans(loop, params, features) == 0
    got = _value_and_grad(scanned, params, features, _head_outputs)
    _assert_close(got, _value_and_grad(loop, params, features, _head_outputs))


def _loss_and_grads(scan: bool) -> tuple:
    """The training step's loss (``trainer.make_loss_fn``: smoke backbone with RecycleLoRA, tiny
    Mask2Former with 4 decoder layers, the set loss) and its gradients to every trainable leaf,
    at random parameters and a random batch, float32."""
    cfg = smoke(base_config())
    cfg.model.head.update(decoder_layers=4, scan_layers=scan)
    cfg.data.crop_size = 32
    setup, state, frozen, _ = trainer.abstract_train_state(cfg, make_mesh(**cfg.mesh))
    random = lambda tree, seed: _jitter(
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree), seed
    )
    trainable, frozen = random(state["trainable"], 6), random(frozen, 7)
    images = jax.random.normal(jax.random.key(8), (2, 32, 32, 3))
    labels = jax.random.randint(jax.random.key(9), (2, 32, 32), 0, 21).astype(jnp.int32)
    labels = jnp.where(labels >= 19, 255, labels)  # some ignored pixels
    loss_fn = trainer.make_loss_fn(setup)
    loss = lambda t: loss_fn(t, frozen, images, labels, jax.random.key(10))[0]
    return jax.jit(jax.value_and_grad(loss))(trainable)


def test_scanned_decoder_rounds_give_the_training_steps_gradients():
    """``model.head.scan_layers`` through the loss the training step differentiates: one
    scanned round of decoder layers plus one unrolled, then the set loss over all five
    prediction sets: loss and every trainable gradient (adapters and head) as unrolled."""
    got, want = _loss_and_grads(True), _loss_and_grads(False)
    _assert_close(got, want)
    assert (
        float(
            jnp.abs(got[1]["head"]["transformer_decoder"]["layers_1"]["ffn"]["fc1"]["kernel"]).max()
        )
        > 0
    )
