"""The recipe tables: every leaf of every method's model at ViT-S/B/L/g sizes is labelled, and
each method trains exactly the parameters its formula counts (shapes only: nothing allocated)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest
from flax import traverse_util

from recyclelora_jax import build, recipe
from recyclelora_jax.config import FROZEN, METHODS, apply_method, base_config
from recyclelora_jax.models.dinov2 import ARCHS
from recyclelora_jax.peft.params import attach, attach_shapes

ARCH_NAMES = ("vits14", "vitb14", "vitl14", "vitg14")
TINY = ARCHS["tiny"]
# Adapter ranks per group: RecycleLoRA 32 + 4; one adapter of rank 36 for PiSSA/MiLoRA/LoRA.
RANKS = {
    "recyclelora": {"main": 32, "sub": 4},
    "swapped": {"main": 32, "sub": 4},
    "main-only": {"main": 32},
    "sub-only": {"sub": 4},
    "pissa": {"main": 36},
    "milora": {"main": 36},
    "lora": {"main": 36},
}


def _config(method: str, arch: str):
    c = apply_method(base_config(), method)
    depth = ARCHS[arch].depth
    c.model.backbone.update(arch=arch, out_indices=tuple(depth * k // 4 - 1 for k in (1, 2, 3, 4)))
    c.data.crop_size = 64  # head parameter shapes do not depend on the crop
    return c


@functools.cache
def _head_shapes(arch: str):
    return build.segmentor_shapes(_config("recyclelora", arch))[1]["head"]


@functools.cache
def _group_sizes(method: str, arch: str) -> dict[str, int]:
    """Parameters per optimizer group of the config's model, from shapes alone (the head's
    shapes, the same for every method, traced once per architecture)."""
    cfg = _config(method, arch)
    plan = recipe.from_config(cfg, build.config_arch(cfg))
    backbone, _ = attach_shapes(build.config_arch(cfg), plan.attach)
    params = {"backbone": backbone, "head": _head_shapes(arch)}
    labels = recipe.label_params(params, plan.labels, plan.groups)  # raises on uncovered leaves
    sizes: dict[str, int] = {}
    flat_labels = traverse_util.flatten_dict(labels, sep="/")
    for path, leaf in traverse_util.flatten_dict(params, sep="/").items():
        sizes[flat_labels[path]] = sizes.get(flat_labels[path], 0) + int(np.prod(leaf.shape))
    return sizes


def _per_rank_and_bias(arch) -> tuple[int, int]:
    """Per block: sum of (in + out) over the linear layers (an adapter of rank r has r times
    that), and the size of their biases."""
    d, h = arch.embed_dim, arch.mlp_hidden
    if arch.ffn == "swiglu":  # qkv, proj, w12 (d -> 2h), w3
        return 4 * d + 2 * d + (d + 2 * h) + (h + d), 3 * d + d + 2 * h + d
    return 4 * d + 2 * d + (d + h) + (h + d), 3 * d + d + h + d


def _backbone_size(arch, patch: int = 16, grid: int = 32) -> int:
    """Every parameter of the DINOv2 ViT, written out."""
    d, h = arch.embed_dim, arch.mlp_hidden
    ffn = d * 2 * h + 2 * h + h * d + d if arch.ffn == "swiglu" else d * h + h + h * d + d
    block = 4 * d + 2 * d + (3 * d * d + 3 * d) + (d * d + d) + ffn
    embed = patch * patch * 3 * d + d + d + (1 + grid * grid) * d + d  # conv, cls, pos, mask
    return embed + arch.depth * block + 2 * d


@pytest.mark.parametrize("arch_name", ARCH_NAMES)
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_labels_every_leaf_and_trains_its_formula(method, arch_name):
    arch = ARCHS[arch_name]
    sizes = dict(_group_sizes(method, arch_name))
    per_rank, bias = _per_rank_and_bias(arch)
    sizes.pop("head"), sizes.pop("head_no_decay")  # the whole head trains (own test below)
    backbone = _backbone_size(arch)
    if method in RANKS:
        want = {g: arch.depth * r * per_rank for g, r in RANKS[method].items()}
    elif method == "soma":  # rank 16 and the adapted biases, blocks 8 on
        want = {"backbone": (arch.depth - 8) * (16 * per_rank + bias)}
    elif method == "full":
        norms = arch.depth * 4 * arch.embed_dim + 2 * arch.embed_dim
        want = {"backbone": backbone - norms, "backbone_no_decay": norms}
    else:
        want = {}
    trained = {g: n for g, n in sizes.items() if g != FROZEN}
    assert trained == want
    # What stays frozen is the pretrained backbone less its trainable non-adapter leaves.
    frozen = {"full": 0, "soma": backbone - (arch.depth - 8) * bias}.get(method, backbone)
    assert sizes.get(FROZEN, 0) == frozen


def test_paper_setting_trains_exactly_the_adapters_and_the_head():
    sizes = _group_sizes("recyclelora", "vitl14")
    assert sizes["main"] == 12_582_912 and sizes["sub"] == 1_572_864
    assert set(sizes) == {"main", "sub", "head", "head_no_decay", FROZEN}


def test_head_weight_decay_follows_the_official_custom_keys():
    """``query_embed`` and the decoder's ``level_embed`` (official keys) and norms: no decay;
    ``query_feat`` and the pixel decoder's level embedding match no key: base decay."""
    _, params, plan = build.segmentor_shapes(_config("recyclelora", "vits14"))
    labels = traverse_util.flatten_dict(
        recipe.label_params(params, plan.labels, plan.groups)["head"], sep="/"
    )
    assert labels["transformer_decoder/query_embed"] == "head_no_decay"
    assert labels["transformer_decoder/level_embed"] == "head_no_decay"
    assert labels["transformer_decoder/decoder_norm/scale"] == "head_no_decay"
    assert labels["pixel_decoder/input_proj_norm_0/bias"] == "head_no_decay"
    assert labels["transformer_decoder/query_feat"] == "head"
    assert labels["pixel_decoder/level_embed"] == "head"


def test_soma_on_vitg_trains_its_swiglu_adapters():
    """Labels come from the adapters attached, so ViT-g's ``w12``/``w3`` adapters train."""
    cfg = _config("soma", "vitg14")
    _, params, plan = build.segmentor_shapes(cfg)
    labels = traverse_util.flatten_dict(
        recipe.label_params(params, plan.labels, plan.groups)["backbone"], sep="/"
    )
    adapters = {p: g for p, g in labels.items() if "/adapter_" in p}
    assert len(adapters) == 2 * 4 * (40 - 8)
    assert set(adapters.values()) == {"backbone"}
    assert labels["blocks_9/mlp/w12/bias"] == "backbone"
    assert labels["blocks_7/mlp/w12/bias"] == FROZEN


def test_ablations_are_told_apart(tiny_backbone):
    """main-only / sub-only differ in what exists; swapped differs from RecycleLoRA in the
    directions it starts from, on a real (tiny) backbone, while both start at the pretrained
    function."""
    cfg = {m: apply_method(base_config(), m) for m in ("recyclelora", "swapped")}
    plans = {m: recipe.from_config(c, TINY) for m, c in cfg.items()}
    assert [r.method for r in plans["swapped"].attach] == ["swapped"]
    small = dataclasses.replace(plans["recyclelora"].attach[0], ranks=(("main", 4), ("sub", 2)))
    params, _ = tiny_backbone
    ours, _ = attach(params, TINY, [small], progress=False)
    swapped, _ = attach(
        params, TINY, [dataclasses.replace(small, method="swapped")], progress=False
    )
    a, b = ours["blocks_0"]["attn"]["qkv"], swapped["blocks_0"]["attn"]["qkv"]
    assert not np.allclose(a["adapter_main"]["b"], b["adapter_main"]["b"])
    assert not np.allclose(a["kernel"], b["kernel"])
    assert set(_group_sizes("main-only", "vits14")) - {FROZEN} == {"main", "head", "head_no_decay"}
    assert set(_group_sizes("sub-only", "vits14")) - {FROZEN} == {"sub", "head", "head_no_decay"}


def test_errors_name_what_is_wrong():
    cfg = base_config()
    cfg.adapters = (dict(cfg.adapters[0], layers="no_such_layer"),)
    with pytest.raises(ValueError, match="adapt no linear layer"):
        recipe.from_config(cfg, TINY)
    cfg = base_config()
    cfg.adapters = (dict(cfg.adapters[0], ranks=dict(main=4)),)
    with pytest.raises(ValueError, match=r"adapters\[0\]: init 'recyclelora' creates"):
        recipe.from_config(cfg, TINY)
    cfg = base_config()
    cfg.params = cfg.params[1:]  # the frozen backbone rule dropped
    _, params, plan = build.segmentor_shapes(_config("recyclelora", "vits14"))
    plan = recipe.from_config(cfg, ARCHS["vits14"])
    with pytest.raises(ValueError, match=r"match no label rule: \['backbone/"):
        recipe.label_params(params, plan.labels, plan.groups)
    with pytest.raises(ValueError, match="rewrites the recyclelora recipe"):
        apply_method(apply_method(base_config(), "lora"), "soma")


def test_printed_config_shows_the_recipe():
    text = str(apply_method(base_config(), "soma"))
    for part in ("adapters", "init: soma", "blocks", "params", "^backbone/", "groups", "lr_mult"):
        assert part in text, part


def test_abstract_shapes_allocate_nothing():
    _, params, _ = build.segmentor_shapes(_config("recyclelora", "vitg14"))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
