"""Every config file loads with its arguments and builds (shapes only: nothing is allocated);
the recipe tables themselves are tested in ``test_recipe.py``."""

from __future__ import annotations

import importlib.util

import jax
import numpy as np
import pytest
from flax import traverse_util
from train_helpers import REPO

from recyclelora_jax import build, recipe
from recyclelora_jax.config import FROZEN, METHODS, parse_arg
from recyclelora_jax.convert import save_converted
from recyclelora_jax.models.dinov2 import ARCHS, DinoV2

CONFIGS = ("g2cbm", "c2bm", "gs2cbm", "gsu2cbm", "demo")


def load_config(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def group_sizes(cfg) -> dict[str, int]:
    """Parameter count per optimizer group of the config's model, from shapes alone."""
    _, params, plan = build.segmentor_shapes(cfg)
    labels = recipe.label_params(params, plan.labels, plan.groups)
    sizes: dict[str, int] = {}
    flat_labels = traverse_util.flatten_dict(labels, sep="/")
    for path, leaf in traverse_util.flatten_dict(params, sep="/").items():
        sizes[flat_labels[path]] = sizes.get(flat_labels[path], 0) + int(np.prod(leaf.shape))
    return sizes


@pytest.mark.parametrize("method", METHODS)
def test_every_method_builds_at_smoke_size(method):
    sizes = group_sizes(load_config("g2cbm", f"method={method},smoke"))
    trainable_backbone = {g for g in sizes if g in ("main", "sub", "backbone")}
    assert bool(trainable_backbone) == (method != "frozen")
    assert (FROZEN in sizes) == (method != "full")


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
    (entry,) = cfg.adapters
    assert (entry["ranks"], entry["alpha"], entry["blocks"][0]) == ({"lora": 16}, 16.0, 8)
    assert (entry["groups"], entry["bias"]) == ({"lora": "backbone"}, "backbone")
    assert (cfg.optim.ema_momentum, cfg.optim.ema_start, cfg.groups.backbone.lr_mult) == (
        2e-4,
        12_000,
        0.5,
    )


def test_cityscapes_source_uses_sub_rank_2():
    assert load_config("c2bm").adapters[0]["ranks"] == {"main": 32, "sub": 2}


def test_register_weights_keep_their_own_interpolation(tmp_path):
    """``interpolate_offset=None`` (the default) leaves a register model's size form with
    antialiasing as the file says; a number in the config overrides it."""
    arch = ARCHS["tiny_reg4"]  # the smoke config's backbone with 4 registers
    model = DinoV2(arch, out_indices=(1,), interpolate_offset=0.0, interpolate_antialias=True)
    params = model.init(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))["params"]
    save_converted(tmp_path / "reg4.safetensors", model, params)
    cfg = load_config("g2cbm", "smoke")
    cfg.model.backbone.weights = str(tmp_path / "reg4.safetensors")
    loaded, _ = build.load_backbone_weights(cfg, seed=0)
    assert (loaded.interpolate_offset, loaded.interpolate_antialias) == (0.0, True)
    cfg.model.backbone.interpolate_offset = 0.1
    loaded, _ = build.load_backbone_weights(cfg, seed=0)
    assert loaded.interpolate_offset == 0.1


def test_raw_padding_where_the_official_pipelines_pad():
    """g2cbm and c2bm pad each crop in raw pixels (their ``Pad`` step after ``RandomCrop``); the
    multi-source pipelines have no ``Pad`` step."""
    pads = {name: load_config(name).data.pad_raw for name in ("g2cbm", "c2bm", "gs2cbm", "gsu2cbm")}
    assert pads == {"g2cbm": True, "c2bm": True, "gs2cbm": False, "gsu2cbm": False}


def test_only_the_demo_standardises_each_image():
    """The demo's stand-in backbone reads per-image standardised inputs (pretraining, every
    method's training and evaluation alike, through the segmentor's backbone); the real
    configs keep DINOv2's dataset normalisation."""
    for name in CONFIGS:
        cfg = load_config(name)
        model, _, _ = build.segmentor_shapes(cfg)
        assert model.backbone.input_norm == ("image" if name == "demo" else "dataset"), name
