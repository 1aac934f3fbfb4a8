"""The full segmentor: parameter-tree contract, both heads, and an 8-device sharded grad step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from train_helpers import tiny_segmentor

from recyclelora_jax.config import TINY_MASK2FORMER
from recyclelora_jax.heads import build_head, head_spec
from recyclelora_jax.losses import LossConfig
from recyclelora_jax.models.segmentor import Segmentor

K = 5
CFG = LossConfig(num_classes=K, num_points=32)
QUERIES = TINY_MASK2FORMER["num_queries"]


def _batch(b=8, size=32):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(b, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, K, size=(b, size // 8, size // 8)).repeat(8, 1).repeat(8, 2)
    labels[rng.random(labels.shape) < 0.2] = 255
    labels[1] = 255  # one image without any valid pixel
    return jnp.asarray(images), jnp.asarray(labels.astype(np.int32))


def _paths(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, (*prefix, k))
    else:
        yield prefix


@pytest.mark.parametrize("head", ["mask2former", "linear"])
def test_segmentor_contract(head):
    model = tiny_segmentor(head, K)
    images, _ = _batch(2)
    params = jax.jit(model.init)(jax.random.key(0), images)["params"]
    assert set(params) == {"backbone", "head"}
    paths = list(_paths(params["head"]))
    # every normalisation layer (the ones with a "scale") carries "norm" in its module name
    assert all("norm" in p[-2] for p in paths if p[-1] == "scale")
    if head == "mask2former":
        leaves = {p[-1] for p in paths}
        assert {"query_feat", "query_embed", "level_embed"} <= leaves
        out = jax.eval_shape(model.apply, {"params": params}, images)
        assert out["pred_logits"].shape == (2, QUERIES, K + 1)
        # patch 8 here, so the x4 pyramid level is at stride 2: 16x16
        assert out["pred_masks"].shape == (2, QUERIES, 16, 16)
        assert out["aux_masks"].shape == (1, 2, QUERIES, 16, 16)
    scores = jax.jit(lambda p, x: model.apply({"params": p}, x, method=Segmentor.predict))(
        params, images
    )
    assert scores.shape == (2, 32, 32, K) and np.isfinite(scores).all()


def test_build_head_unknown():
    with pytest.raises(ValueError, match=r"model\.head\.name='fcn' unknown"):
        build_head("fcn", K)


def test_sharded_grad_equals_single_device(mesh8):
    """jax.grad on a batch sharded over 8 simulated devices == one device, within 1e-5
    (matching, point sampling and the batch-wide normalisers included)."""
    model = tiny_segmentor("mask2former", K)
    images, labels = _batch(8)
    params = jax.jit(model.init)(jax.random.key(0), images[:1])["params"]

    def loss(p, x, y):
        out = model.apply({"params": p}, x, train=True)
        return head_spec("mask2former").loss(out, y, jax.random.key(3), CFG)[0]

    step = jax.jit(jax.value_and_grad(loss))
    single = step(params, images, labels)
    mesh = mesh8
    shard = NamedSharding(mesh, PartitionSpec("data"))
    with jax.set_mesh(mesh):
        sharded = step(params, jax.device_put(images, shard), jax.device_put(labels, shard))
    np.testing.assert_allclose(sharded[0], single[0], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), sharded[1], single[1]
    )
