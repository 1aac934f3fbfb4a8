"""Attaching adapters by rule, function preservation at init, merge/unmerge, counts, caching."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from recyclelora_jax.model_io import load_tree, save_tree
from recyclelora_jax.models.dinov2 import ARCHS, DinoV2
from recyclelora_jax.peft.params import (
    AttachRule,
    adapter_layout,
    attach,
    attach_shapes,
    merge,
    unmerge,
)

RANKS = {
    "recyclelora": (("main", 8), ("sub", 2)),
    "soma": (("lora", 4),),
    "pissa": (("lora", 4),),
    "milora": (("lora", 4),),
    "lora": (("lora", 4),),
}
ALL_LINEAR = ""  # every linear layer the backbone declares
TINY = ARCHS["tiny"]


def _max_diff(xs, ys):
    pairs = zip(xs, ys, strict=True)
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in pairs)


def run_backbone(params, images, layout=()):
    """All non-empty outputs of the backbone built with ``layout``, as a list of arrays."""
    model = DinoV2(TINY, out_indices=(1, 3), layerscale_init=1.0, adapters=layout)
    outputs = model.apply({"params": params}, images)  # eager: cheaper than a compile here
    return [x for x in jax.tree.leaves(outputs) if x.size]


@pytest.mark.parametrize("method", sorted(RANKS))
def test_adapted_backbone_equals_pretrained_at_init(tiny_backbone, method):
    params, images = tiny_backbone
    rule = AttachRule(ALL_LINEAR, method, RANKS[method], alpha=2.0)
    adapted, layout = attach(params, TINY, [rule], progress=False)
    assert len(layout) == 4 * TINY.depth
    reference = run_backbone(params, images)
    assert _max_diff(run_backbone(adapted, images, layout), reference) <= 1e-5


def test_merge_equals_adapted_and_loads_into_plain_backbone(tiny_backbone):
    params, images = tiny_backbone
    rule = AttachRule(ALL_LINEAR, "recyclelora", RANKS["recyclelora"])
    adapted, layout = attach(params, TINY, [rule], progress=False)
    # Move away from init so that the adapters carry a real update.
    rng = np.random.default_rng(5)
    flat = traverse_util.flatten_dict(adapted, sep="/")
    for key in [k for k in flat if "adapter_" in k]:
        flat[key] = flat[key] + 0.05 * rng.standard_normal(flat[key].shape).astype(np.float32)
    adapted = traverse_util.unflatten_dict(flat, sep="/")
    merged = merge(adapted, layout)
    plain_shapes = jax.tree.map(lambda x: x.shape, params)
    assert jax.tree.map(lambda x: x.shape, merged) == plain_shapes
    out_adapted = run_backbone(adapted, images, layout)
    out_merged = run_backbone(merged, images)  # the adapter-free DinoV2
    assert _max_diff(out_merged, out_adapted) <= 1e-5
    assert _max_diff(out_merged, run_backbone(params, images)) > 1e-3  # the update is real
    restored = unmerge(merged, adapted, layout)
    assert _max_diff(jax.tree.leaves(restored), jax.tree.leaves(adapted)) <= 1e-6


def test_vitl_adapter_count_without_allocation():
    rule = AttachRule(ALL_LINEAR, "recyclelora", (("main", 32), ("sub", 4)))
    shapes, layout = attach_shapes(ARCHS["vitl14"], [rule])
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
    flat = traverse_util.flatten_dict(shapes, sep="/")

    def count(tag):
        return sum(int(np.prod(v.shape)) for k, v in flat.items() if tag in k)

    assert len(layout) == 96
    assert count("adapter_main/") == 12_582_912
    assert count("adapter_sub/") == 1_572_864
    assert count("adapter_") == 14_155_776


def test_attach_shapes_are_the_adapted_models_params():
    rules = [AttachRule("qkv|fc2", "recyclelora", (("main", 4), ("sub", 1)), blocks=(1, 3))]
    shapes, layout = attach_shapes(TINY, rules)
    model = DinoV2(TINY, out_indices=(), adapters=layout)
    image = jax.ShapeDtypeStruct((1, 8, 8, 3), np.float32)
    assert shapes == jax.eval_shape(model.init, jax.random.key(0), image)["params"]


def test_rules_first_match_and_block_range():
    rules = [
        AttachRule(r"attn/qkv$", "lora", (("lora", 2),), 2.0, blocks=(1, 3)),
        AttachRule(r"qkv|fc2", "recyclelora", (("main", 4), ("sub", 1))),
    ]
    layout = dict(adapter_layout(TINY, rules))
    assert sorted(layout) == sorted(
        [f"blocks_{i}/attn/qkv" for i in range(4)] + [f"blocks_{i}/mlp/fc2" for i in range(4)]
    )
    assert layout["blocks_1/attn/qkv"].ranks == (("lora", 2),)
    assert layout["blocks_1/attn/qkv"].scale == 1.0
    assert layout["blocks_0/attn/qkv"].ranks == (("main", 4), ("sub", 1))
    assert layout["blocks_0/attn/qkv"].scale == pytest.approx(0.2)
    soma_rule = AttachRule(ALL_LINEAR, "soma", (("lora", 16),), 16.0, (8, 24))
    soma = dict(adapter_layout(ARCHS["vitl14"], [soma_rule]))
    assert len(soma) == 64 and "blocks_7/mlp/fc1" not in soma and "blocks_8/mlp/fc1" in soma
    with pytest.raises(ValueError, match="needs ranks for"):
        adapter_layout(TINY, [AttachRule("qkv", "soma", (("main", 2),))])
    with pytest.raises(ValueError, match="adapt no linear layer"):
        adapter_layout(TINY, [AttachRule("nothing", "lora", (("lora", 2),))])


def test_attach_reports_missing_layer(tiny_backbone):
    params, _ = tiny_backbone
    broken = {k: v for k, v in params.items() if k != "blocks_2"}
    with pytest.raises(KeyError, match="no layer 'blocks_2/attn/qkv'"):
        attach(broken, TINY, [AttachRule(ALL_LINEAR, "lora", (("lora", 2),))], progress=False)


def test_attach_is_deterministic_and_cached(tiny_backbone, tmp_path, monkeypatch):
    params, _ = tiny_backbone
    rules = [
        AttachRule(r"qkv|proj", "recyclelora", (("main", 4), ("sub", 2))),
        AttachRule(r"fc1|fc2", "lora", (("lora", 4),)),
    ]
    one, layout = attach(params, TINY, rules, workers=1, progress=False)
    two, _ = attach(params, TINY, rules, workers=2, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.npz"))) == len(layout)
    jax.tree.map(np.testing.assert_array_equal, one, two)

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr("recyclelora_jax.peft.params.run_init", fail)
    three, _ = attach(params, TINY, rules, cache_dir=tmp_path, progress=False)
    jax.tree.map(np.testing.assert_array_equal, one, three)
    # A different kernel is a different cache entry: the cache never serves stale inits.
    changed = jax.tree.map(lambda x: x * 2, params)
    with pytest.raises(AssertionError, match="recomputed"):
        attach(changed, TINY, rules, cache_dir=tmp_path, progress=False)
    # So is any change of method, either rank, alpha or seed.
    variants = [
        ([AttachRule(r"qkv|proj", "swapped", (("main", 4), ("sub", 2))), rules[1]], 0),
        ([AttachRule(r"qkv|proj", "recyclelora", (("main", 3), ("sub", 2))), rules[1]], 0),
        ([AttachRule(r"qkv|proj", "recyclelora", (("main", 4), ("sub", 1))), rules[1]], 0),
        ([rules[0], AttachRule(r"fc1|fc2", "lora", (("lora", 4),), alpha=2.0)], 0),
        (rules, 1),
    ]
    for variant, seed in variants:
        with pytest.raises(AssertionError, match="recomputed"):
            attach(params, TINY, variant, seed=seed, cache_dir=tmp_path, progress=False)
    file = tmp_path / "tree.safetensors"
    save_tree(file, one)
    jax.tree.map(np.testing.assert_array_equal, one, load_tree(file)[0])
