"""Every config file and PEFT method yields a complete, consistent plan at the paper's sizes
(shapes only: nothing is allocated)."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from train_helpers import REPO

from recyclelora_jax import build
from recyclelora_jax.config import METHODS, parse_arg
from recyclelora_jax.peft.params import attach_shapes
from recyclelora_jax.train import optim

CONFIGS = ("g2cbm", "c2bm", "gs2cbm", "gsu2cbm", "demo")


def load_config(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def group_sizes(cfg) -> dict[str, int]:
    """Parameter count per optimizer group of the config's model, from shapes alone."""
    b = cfg.model.backbone
    arch = build.arch_from_name(b.arch)
    arch = arch.__class__(**{**arch.__dict__, "patch_size": b.patch_size, "pos_grid": b.pos_grid})
    plan = build.peft_plan(cfg.peft, cfg.optim, arch.depth)
    backbone, layout = attach_shapes(arch, plan.attach_rules)
    model = build.build_segmentor(cfg, build.DinoV2(arch, out_indices=tuple(b.out_indices)), layout)
    crop = cfg.data.crop_size
    feats = jax.eval_shape(
        model.backbone.init_with_output,
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, crop, crop, 3), jnp.float32),
    )[0]["features"]
    head = jax.eval_shape(model.head.init, jax.random.key(0), feats)["params"]
    params = {"backbone": backbone, "head": head}
    labels = optim.label_params(params, plan.label_rules, plan.groups)
    sizes: dict[str, int] = {}
    flat_labels = traverse_util.flatten_dict(labels, sep="/")
    for path, leaf in traverse_util.flatten_dict(params, sep="/").items():
        sizes[flat_labels[path]] = sizes.get(flat_labels[path], 0) + int(np.prod(leaf.shape))
    return sizes


def test_paper_setting_trains_exactly_the_adapters_and_the_head():
    sizes = group_sizes(load_config("g2cbm"))
    assert sizes["main"] == 12_582_912 and sizes["sub"] == 1_572_864  # SPEC §3
    assert set(sizes) == {"main", "sub", "head", "head_no_decay", optim.FROZEN}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_has_a_complete_plan(method):
    cfg = load_config("g2cbm", f"method={method},smoke")
    sizes = group_sizes(cfg)  # raises if a leaf matches no rule or a rule names no group
    trainable_backbone = {g: n for g, n in sizes.items() if g in ("main", "sub", "backbone")}
    if method == "frozen":
        assert not trainable_backbone
    else:
        assert trainable_backbone
    if method == "full":
        assert optim.FROZEN not in sizes


@pytest.mark.parametrize("name", CONFIGS)
def test_config_files_load_with_their_arguments(name):
    cfg = load_config(name, "seed=3")
    assert cfg.seed == 3
    smoke = load_config(name, "smoke")
    assert smoke.train.steps < 100
    group_sizes(smoke)  # the shrunk model builds
    with pytest.raises(ValueError, match="unknown config arguments"):
        load_config(name, "sedd=3")


def test_parse_arg():
    assert parse_arg("smoke,seed=1,method=soma") == {"smoke": True, "seed": 1, "method": "soma"}
    assert parse_arg(None) == {}


def test_soma_recipe():
    cfg = load_config("g2cbm", "method=soma")
    assert (cfg.peft.r_main, cfg.peft.alpha, cfg.peft.blocks[0]) == (16, 16.0, 8)
    assert (cfg.optim.ema_momentum, cfg.optim.ema_start, cfg.optim.backbone_lr_mult) == (
        2e-4,
        12_000,
        0.5,
    )
