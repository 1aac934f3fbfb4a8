"""From a config to the model a run trains: backbone weights, adapters, head, abstract shapes.

Kept apart from the training loop so that ``eval.py``, the export and the analyses rebuild
exactly the model a checkpoint was trained with from the config stored in it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from recyclelora_jax import recipe
from recyclelora_jax.convert import default_interpolation, load_dinov2
from recyclelora_jax.heads import build_head
from recyclelora_jax.models.adapters import AdapterLayout
from recyclelora_jax.models.dinov2 import ARCHS, DinoV2, DinoV2Arch
from recyclelora_jax.models.segmentor import Segmentor
from recyclelora_jax.peft.params import attach, attach_shapes

Params = dict[str, Any]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _dtype(name: str) -> Any:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def arch_from_name(name: str) -> DinoV2Arch:
    if name not in ARCHS:
        raise ValueError(f"model.backbone.arch={name!r} unknown; known: {sorted(ARCHS)}")
    return ARCHS[name]


def config_arch(cfg: ml_collections.ConfigDict) -> DinoV2Arch:
    """The backbone architecture the config names (a weights file brings its own)."""
    b = cfg.model.backbone
    return dataclasses.replace(arch_from_name(b.arch), patch_size=b.patch_size, pos_grid=b.pos_grid)


def backbone_module(cfg: ml_collections.ConfigDict, arch: DinoV2Arch) -> DinoV2:
    """The backbone of ``arch`` with the config's settings; ``interpolate_offset`` None keeps
    the official rule of that kind of model (``convert.default_interpolation``)."""
    b = cfg.model.backbone
    offset, antialias = default_interpolation(arch)
    return DinoV2(
        arch,
        out_indices=tuple(b.out_indices),
        interpolate_offset=offset if b.interpolate_offset is None else b.interpolate_offset,
        interpolate_antialias=antialias,
        layerscale_init=b.get("layerscale_init", 1e-5),  # configs stored before the option
        dtype=_dtype(b.dtype),
        param_dtype=_dtype(b.param_dtype),
        remat=b.remat,
    )


def load_backbone_weights(cfg: ml_collections.ConfigDict, seed: int) -> tuple[DinoV2, Params]:
    """The frozen base: converted pretrained weights (with the reference's 16 px / 32x32
    conversion when the config asks for it), or a seeded random ViT when ``weights`` is empty.
    ``interpolate_offset`` None keeps the checkpoint's own interpolation rule."""
    b = cfg.model.backbone
    if b.weights:
        return load_dinov2(
            Path(b.weights).expanduser(),
            patch_size=b.patch_size,
            pos_grid=b.pos_grid,
            interpolate_offset=b.interpolate_offset,
            out_indices=tuple(b.out_indices),
            dtype=_dtype(b.dtype),
            param_dtype=_dtype(b.param_dtype),
            remat=b.remat,
        )
    model = backbone_module(cfg, config_arch(cfg))
    patch = model.arch.patch_size
    image = jnp.zeros((1, patch, patch, 3), jnp.float32)
    params = jax.jit(model.init)(jax.random.key(seed), image)["params"]
    return model, params


def build_segmentor(
    cfg: ml_collections.ConfigDict, backbone: DinoV2, layout: AdapterLayout = ()
) -> Segmentor:
    h = dict(cfg.model.head)
    h.pop("loss", None)
    name, num_classes = h.pop("name"), h.pop("num_classes")
    b = cfg.model.backbone
    backbone = backbone.clone(
        adapters=layout,
        attention=b.get("attention", "auto"),
        scan_layers=b.get("scan_layers", False),  # configs stored before the option: unrolled
        input_norm=b.get("input_norm", "dataset"),
    )
    return Segmentor(backbone, build_head(name, num_classes, **h))


def init_head(model: Segmentor, crop: int, seed: int) -> Params:
    """Head parameters only, initialised on zero features of the backbone's output shapes (no
    backbone is run or traced)."""
    b = model.backbone
    grid = crop // b.arch.patch_size
    zeros = [jnp.zeros((1, grid, grid, b.arch.embed_dim), jnp.float32) for _ in b.out_indices]
    return jax.jit(model.head.init)(jax.random.key(seed), zeros)["params"]


def init_params(
    cfg: ml_collections.ConfigDict, backbone: DinoV2, base: Params, workdir: Path
) -> tuple[Segmentor, Params]:
    """The adapted model and its starting parameters ``{"backbone", "head"}``: the recipe's
    adapters attached to ``base`` (host-side init, cached in ``workdir/init_cache``), the head
    initialised from the config seed."""
    plan = recipe.from_config(cfg, backbone.arch)
    adapted, layout = attach(
        base,
        backbone.arch,
        plan.attach,
        seed=cfg.seed,
        cache_dir=workdir / "init_cache" if cfg.init_cache else None,
        progress=jax.process_index() == 0,
    )
    model = build_segmentor(cfg, backbone, layout)
    return model, {"backbone": adapted, "head": init_head(model, cfg.data.crop_size, cfg.seed)}


def segmentor_shapes(
    cfg: ml_collections.ConfigDict, backbone: DinoV2 | None = None
) -> tuple[Segmentor, Params, recipe.Recipe]:
    """The adapted model, its abstract params ``{"backbone", "head"}`` (ShapeDtypeStructs) and
    the recipe, for ``backbone`` (default: the config's architecture); allocates nothing and
    runs no init."""
    backbone = backbone or backbone_module(cfg, config_arch(cfg))
    plan = recipe.from_config(cfg, backbone.arch)
    shapes, layout = attach_shapes(backbone.arch, plan.attach, backbone.param_dtype)
    model = build_segmentor(cfg, backbone, layout)
    head = jax.eval_shape(lambda: init_head(model, cfg.data.crop_size, cfg.seed))
    return model, {"backbone": shapes, "head": head}, plan
