"""From a config to the objects a run needs: backbone weights, adapter plan, model, optimizer.

Kept apart from the training loop so that ``eval.py``, the export and the analyses rebuild
exactly the model a checkpoint was trained with from the config stored in it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from recyclelora_jax.convert import load_dinov2
from recyclelora_jax.losses import LossConfig
from recyclelora_jax.models.dinov2 import ARCHS, DinoV2, DinoV2Arch
from recyclelora_jax.models.segmentor import Segmentor, build_head
from recyclelora_jax.peft.layers import AdapterLayout
from recyclelora_jax.peft.params import AttachRule
from recyclelora_jax.train import optim
from recyclelora_jax.train.optim import FROZEN, OptimConfig, ParamGroup

Params = dict[str, Any]

# A small DINOv2-shaped ViT for smoke runs, tests and the demo (heads = width / 64, as DINOv2).
TINY = DinoV2Arch(embed_dim=128, depth=4, num_heads=2, patch_size=8, pos_grid=8)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# PEFT methods -> the adapters each creates (rank taken from the config) and its label rules.
_ADAPTERS = {
    "recyclelora": ("main", "sub"),
    "swapped": ("main", "sub"),
    "main-only": ("main",),
    "sub-only": ("sub",),
    "soma": ("lora",),
    "pissa": ("lora",),
    "milora": ("lora",),
    "lora": ("lora",),
    "full": (),
    "frozen": (),
}


@dataclasses.dataclass(frozen=True)
class PeftPlan:
    """Which layers get which adapters, and how every parameter is trained."""

    attach_rules: tuple[AttachRule, ...]
    label_rules: tuple[tuple[str, str], ...]
    groups: tuple[ParamGroup, ...]


def _dtype(name: str) -> Any:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def arch_from_name(name: str) -> DinoV2Arch:
    if name == "tiny":
        return TINY
    if name not in ARCHS:
        raise ValueError(f"model.backbone.arch={name!r} unknown; known: tiny, {sorted(ARCHS)}")
    return ARCHS[name]


def peft_plan(peft: Mapping, optim_cfg: Mapping, depth: int) -> PeftPlan:
    """SPEC §3/§5/§8 as rules: RecycleLoRA and its ablations, SoMA, PiSSA/MiLoRA/LoRA, full
    fine-tuning and the frozen backbone."""
    method = peft["method"]
    if method not in _ADAPTERS:
        raise ValueError(f"peft.method={method!r} unknown; known: {sorted(_ADAPTERS)}")
    if method == "full":
        return PeftPlan(
            (),
            optim.full_finetune_rules(),
            optim.full_finetune_groups(optim_cfg["backbone_lr_mult"]),
        )
    if method == "frozen":
        return PeftPlan((), optim.FROZEN_BACKBONE_RULES, optim.FROZEN_BACKBONE_GROUPS)
    rank = {"main": peft["r_main"], "sub": peft["r_sub"], "lora": peft["r_main"]}
    first, stop = peft["blocks"]
    rule = AttachRule(
        peft["targets"],
        method,
        tuple((name, int(rank[name])) for name in _ADAPTERS[method]),
        float(peft["alpha"]),
        (int(first), min(int(stop), depth)),
    )
    head_groups = optim.FROZEN_BACKBONE_GROUPS
    if method == "soma":
        labels = optim.soma_rules(int(first), depth)
        groups = (ParamGroup("backbone", optim_cfg["backbone_lr_mult"], True), *head_groups)
        return PeftPlan((rule,), labels, groups)
    adapted_bias = r"^backbone/.*/(qkv|proj|fc1|fc2|w12|w3)/bias$"
    bias_rules = ((adapted_bias, "backbone"),) if peft["train_adapted_bias"] else ()
    labels = (
        (r"^backbone/.*/adapter_(main|lora)/", "main"),
        (r"^backbone/.*/adapter_sub/", "sub"),
        *bias_rules,
        (r"^backbone/", FROZEN),
        *optim.FROZEN_BACKBONE_RULES[1:],
    )
    groups = (
        ParamGroup("main", optim_cfg["main_lr_mult"], False),
        ParamGroup("sub", optim_cfg["sub_lr_mult"], False),
        ParamGroup("backbone", optim_cfg["backbone_lr_mult"], True),
        *head_groups,
    )
    return PeftPlan((rule,), labels, groups)


def optim_config(cfg: ml_collections.ConfigDict) -> OptimConfig:
    o = cfg.optim
    return OptimConfig(
        lr=o.lr,
        b1=o.b1,
        b2=o.b2,
        eps=o.eps,
        weight_decay=o.weight_decay,
        wd_eta_min=o.weight_decay_min,
        total_steps=cfg.train.steps,
        lr_power=o.power,
        warmup_steps=o.warmup_steps,
    )


def loss_config(cfg: ml_collections.ConfigDict) -> LossConfig:
    return LossConfig(num_classes=cfg.model.head.num_classes, **cfg.model.head.get("loss", {}))


def load_backbone_weights(cfg: ml_collections.ConfigDict, seed: int) -> tuple[DinoV2, Params]:
    """The frozen base: converted pretrained weights (with the reference's 16 px / 32x32
    conversion when the config asks for it), or a seeded random ViT when ``weights`` is empty."""
    b = cfg.model.backbone
    common = dict(
        out_indices=tuple(b.out_indices),
        dtype=_dtype(b.dtype),
        param_dtype=_dtype(b.param_dtype),
        remat=b.remat,
    )
    if b.weights:
        return load_dinov2(
            Path(b.weights).expanduser(),
            patch_size=b.patch_size,
            pos_grid=b.pos_grid,
            interpolate_offset=b.interpolate_offset,
            **common,
        )
    arch = dataclasses.replace(arch_from_name(b.arch), patch_size=b.patch_size, pos_grid=b.pos_grid)
    model = DinoV2(arch, interpolate_offset=b.interpolate_offset, **common)
    image = jnp.zeros((1, arch.patch_size, arch.patch_size, 3), jnp.float32)
    params = jax.jit(model.init)(jax.random.key(seed), image)["params"]
    return model, params


def build_segmentor(
    cfg: ml_collections.ConfigDict, backbone: DinoV2, layout: AdapterLayout = ()
) -> Segmentor:
    h = dict(cfg.model.head)
    h.pop("loss", None)
    name, num_classes = h.pop("name"), h.pop("num_classes")
    return Segmentor(backbone.clone(adapters=layout), build_head(name, num_classes, **h))


def init_head(model: Segmentor, crop: int, seed: int) -> Params:
    """Head parameters only: the backbone's features are abstract shapes, so no random
    backbone is ever materialised."""
    images = jax.ShapeDtypeStruct((1, crop, crop, 3), jnp.float32)
    features = jax.eval_shape(model.backbone.init_with_output, jax.random.key(0), images)[0]
    zeros = [jnp.zeros(f.shape, jnp.float32) for f in features["features"]]
    return jax.jit(model.head.init)(jax.random.key(seed), zeros)["params"]
