"""Checkpoints of the official RecycleLoRA code (mmseg 1.x / mmdet 3.x), in and out.

The official model is an mmseg ``EncoderDecoder``: a DINOv2 backbone whose linear layers are
``RecycleLoRALinear`` (``weight`` holds the frozen residual as saved in train mode, beside
``lora_A_main`` (r, in), ``lora_B_main`` (out, r) and the ``_sub`` pair, all sharing the scale
``lora_alpha / (r_main + r_sub)``) and mmseg's ``Mask2FormerHead`` (mmdet's
``MSDeformAttnPixelDecoder`` and ``Mask2FormerTransformerDecoder``). One table maps each of its
``state_dict`` keys to the Flax parameter(s) it holds -- ``in_proj_weight`` (3C, C) splits into
our q/k/v kernels -- and drives the strict import, the export and the shape checks, so every error
names the official key.

``load_mmseg_checkpoint(path)`` reads an mmengine checkpoint (``{"state_dict", "meta"}``, read
without torch), a bare state dict, or a ``.safetensors`` file, infers the architecture from the
tensors and takes what they cannot tell (head counts, adapter alpha, the backbone's output
blocks) from the checkpoint's ``meta["cfg"]`` when present, else the official config's values.
``save_mmseg_checkpoint`` writes a model back in the same layout (adapters kept or merged).
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from recyclelora_jax import convert, safetensors_file
from recyclelora_jax.models.adapters import ADAPTER_PREFIX, AdapterSpec
from recyclelora_jax.models.dinov2 import DinoV2
from recyclelora_jax.models.mask2former import (
    GN_GROUPS,
    NUM_LEVELS,
    PYRAMID_SCALES,
    Mask2FormerHead,
)
from recyclelora_jax.models.segmentor import Segmentor
from recyclelora_jax.peft.params import merge
from recyclelora_jax.pth import load_pth, write_pth

Params = dict[str, Any]
Path_ = tuple[str, ...]

# What the tensors cannot tell, as the official configs set it.
OFFICIAL = dict(num_heads=8, num_points=4, lora_alpha=1.0, out_indices=(7, 11, 15, 23))
# Official adapter names <-> ours.
_ADAPTERS = {"main": "main", "sub": "sub"}


@dataclasses.dataclass(frozen=True)
class Key:
    """One official tensor: the Flax parameters it is split into along dim 0, and its layout
    ("linear" (out, in), "conv" (O, I, H, W), or "plain")."""

    name: str
    targets: tuple[Path_, ...]
    layout: str


# ----------------------------------------------------------------------------------------------
# The table.


def _linear(name: str, *targets: Path_, bias: bool = True) -> list[Key]:
    keys = [Key(f"{name}.weight", tuple((*t, "kernel") for t in targets), "linear")]
    if bias:
        keys.append(Key(f"{name}.bias", tuple((*t, "bias") for t in targets), "plain"))
    return keys


def _norm(name: str, target: Path_) -> list[Key]:
    return [
        Key(f"{name}.weight", ((*target, "scale"),), "plain"),
        Key(f"{name}.bias", ((*target, "bias"),), "plain"),
    ]


def _conv(name: str, target: Path_, bias: bool = True) -> list[Key]:
    keys = [Key(f"{name}.weight", ((*target, "kernel"),), "conv")]
    if bias:
        keys.append(Key(f"{name}.bias", ((*target, "bias"),), "plain"))
    return keys


def backbone_keys(backbone: DinoV2) -> list[Key]:
    """``backbone.*``: DINOv2's official keys, plus ``lora_{A,B}_{main,sub}`` where adapted."""
    adapters = dict(backbone.adapters)
    keys = []
    for fair, layout in convert.fair_keys(backbone.arch):
        target = ("backbone", *convert.flax_path(fair, layout))
        keys.append(Key(f"backbone.{fair}", (target,), layout))
        layer = "/".join(target[1:-1])
        if fair.endswith(".weight") and layer in adapters:
            for name, _ in adapters[layer].ranks:
                official = next((o for o, ours in _ADAPTERS.items() if ours == name), None)
                if official is None:
                    raise ValueError(
                        f"adapter {name!r} of {layer} has no official key (only main/sub do); "
                        "export it merged"
                    )
                prefix = f"backbone.{fair[: -len('weight')]}lora_"
                node = (*target[:-1], ADAPTER_PREFIX + name)
                keys.append(Key(f"{prefix}A_{official}", ((*node, "a"),), "linear"))
                keys.append(Key(f"{prefix}B_{official}", ((*node, "b"),), "linear"))
    return keys


def head_keys(head: Mask2FormerHead, in_levels: int = len(PYRAMID_SCALES)) -> list[Key]:
    """``decode_head.*``: mmseg's ``Mask2FormerHead`` with mmdet's pixel and transformer
    decoders, as the official config builds them."""
    pd, td = "decode_head.pixel_decoder", "decode_head.transformer_decoder"
    p, t = ("head", "pixel_decoder"), ("head", "transformer_decoder")
    keys = []
    for i in range(NUM_LEVELS):
        keys += _conv(f"{pd}.input_convs.{i}.conv", (*p, f"input_proj_{i}"))
        keys += _norm(f"{pd}.input_convs.{i}.gn", (*p, f"input_proj_norm_{i}"))
    for i in range(head.encoder_layers):
        layer, ours = f"{pd}.encoder.layers.{i}", (*p, f"encoder_{i}")
        for proj in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
            keys += _linear(f"{layer}.self_attn.{proj}", (*ours, "self_attn", proj))
        keys += _ffn(f"{layer}.ffn", (*ours, "ffn"))
        keys += _norm(f"{layer}.norms.0", (*ours, "self_attn_norm"))
        keys += _norm(f"{layer}.norms.1", (*ours, "ffn", "final_norm"))
    keys.append(Key(f"{pd}.level_encoding.weight", ((*p, "level_embed"),), "plain"))
    extra = in_levels - NUM_LEVELS
    for j in range(extra):  # ours count from the coarsest lateral level, mmdet's from the finest
        i = extra - 1 - j
        keys += _conv(f"{pd}.lateral_convs.{i}.conv", (*p, f"lateral_{j}"), bias=False)
        keys += _norm(f"{pd}.lateral_convs.{i}.gn", (*p, f"lateral_norm_{j}"))
        keys += _conv(f"{pd}.output_convs.{i}.conv", (*p, f"output_conv_{j}"), bias=False)
        keys += _norm(f"{pd}.output_convs.{i}.gn", (*p, f"output_norm_{j}"))
    keys += _conv(f"{pd}.mask_feature", (*p, "mask_feature"))
    for i in range(head.decoder_layers):
        layer, ours = f"{td}.layers.{i}", (*t, f"layers_{i}")
        for attn in ("cross_attn", "self_attn"):
            qkv = tuple((*ours, attn, f"{x}_proj") for x in "qkv")
            keys.append(Key(f"{layer}.{attn}.attn.in_proj_weight", _leaf(qkv, "kernel"), "linear"))
            keys.append(Key(f"{layer}.{attn}.attn.in_proj_bias", _leaf(qkv, "bias"), "plain"))
            keys += _linear(f"{layer}.{attn}.attn.out_proj", (*ours, attn, "out_proj"))
        keys += _ffn(f"{layer}.ffn", (*ours, "ffn"))
        keys += _norm(f"{layer}.norms.0", (*ours, "cross_attn_norm"))
        keys += _norm(f"{layer}.norms.1", (*ours, "self_attn_norm"))
        keys += _norm(f"{layer}.norms.2", (*ours, "ffn", "final_norm"))
    keys += _norm(f"{td}.post_norm", (*t, "decoder_norm"))
    for name in ("query_embed", "query_feat", "level_embed"):
        keys.append(Key(f"decode_head.{name}.weight", ((*t, name),), "plain"))
    keys += _linear("decode_head.cls_embed", (*t, "class_embed"))
    for i in range(3):
        keys += _linear(f"decode_head.mask_embed.{2 * i}", (*t, "mask_embed", f"layers_{i}"))
    return keys


def _ffn(name: str, target: Path_) -> list[Key]:
    """mmcv's ``FFN``: ``layers.0.0`` (Linear in a Sequential with the activation), ``layers.1``."""
    return _linear(f"{name}.layers.0.0", (*target, "fc1")) + _linear(
        f"{name}.layers.1", (*target, "fc2")
    )


def _leaf(paths: tuple[Path_, ...], leaf: str) -> tuple[Path_, ...]:
    return tuple((*path, leaf) for path in paths)


def official_keys(model: Segmentor) -> list[Key]:
    """The whole ``state_dict`` of the official model that ``model`` is."""
    if not isinstance(model.head, Mask2FormerHead):
        raise ValueError(f"the official layout has a Mask2Former head, not {type(model.head)}")
    if tuple(model.head.pyramid_scales) != PYRAMID_SCALES:
        raise ValueError(f"the official backbone builds the pyramid {PYRAMID_SCALES}")
    return backbone_keys(model.backbone) + head_keys(model.head)


# ----------------------------------------------------------------------------------------------
# Conversion, both ways.


def parameter_shapes(model: Segmentor) -> dict[Path_, tuple[int, ...]]:
    """Flax path -> shape of every parameter of ``model`` (``jax.eval_shape``, no allocation)."""
    arch = model.backbone.arch
    size = arch.patch_size * arch.pos_grid
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    tree = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _table(model: Segmentor) -> tuple[list[Key], dict[Path_, tuple[int, ...]]]:
    keys, shapes = official_keys(model), parameter_shapes(model)
    covered = [t for k in keys for t in k.targets]
    uncovered = sorted(set(shapes) - set(covered))
    if uncovered or len(covered) != len(set(covered)) or not set(covered) <= set(shapes):
        raise ValueError(
            f"the official key table does not match the model: parameters without a key "
            f"{['/'.join(p) for p in uncovered]}, keys without a parameter "
            f"{['/'.join(p) for p in sorted(set(covered) - set(shapes))]}"
        )
    return keys, shapes


def _official_shape(key: Key, shapes: Mapping[Path_, tuple[int, ...]]) -> tuple[int, ...]:
    parts = [convert.to_torch_shape(shapes[t], key.layout) for t in key.targets]
    return (sum(s[0] for s in parts), *parts[0][1:])


def to_official(model: Segmentor, params: Params) -> OrderedDict[str, np.ndarray]:
    """``params`` as the official model's ``state_dict`` (float32 numpy, official key order)."""
    keys, _ = _table(model)
    params = jax.device_get(params)
    state = OrderedDict()
    for key in keys:
        parts = [
            convert.to_torch(np.asarray(_get(params, t), np.float32), key.layout)
            for t in key.targets
        ]
        # C order: safetensors.numpy writes an array's memory as it lies (a transpose's too)
        state[key.name] = np.ascontiguousarray(np.concatenate(parts, 0))
    return state


def from_official(model: Segmentor, state: Mapping[str, np.ndarray]) -> Params:
    """The Flax params of ``model`` from an official ``state_dict``; every key used, every shape
    right, or a ``ValueError`` listing the missing, unexpected and misshapen keys."""
    keys, shapes = _table(model)
    names = {k.name for k in keys}
    missing = [k.name for k in keys if k.name not in state]
    unexpected = sorted(set(state) - names)
    wrong = [
        f"{k.name}: {tuple(state[k.name].shape)} (expected {_official_shape(k, shapes)})"
        for k in keys
        if k.name in state and tuple(state[k.name].shape) != _official_shape(k, shapes)
    ]
    problems = [
        f"{what} keys {items}"
        for what, items in (("missing", missing), ("unexpected", unexpected), ("misshapen", wrong))
        if items
    ]
    if problems:
        raise ValueError("checkpoint does not fit the official layout: " + "; ".join(problems))
    params: Params = {}
    for key in keys:
        parts = np.split(np.asarray(state[key.name], np.float32), len(key.targets), axis=0)
        for target, part in zip(key.targets, parts, strict=True):
            node = params
            for k in target[:-1]:
                node = node.setdefault(k, {})
            node[target[-1]] = jnp.asarray(convert.from_torch(part, key.layout))
    return params


def _get(tree: Params, path: Path_) -> Any:
    for k in path:
        tree = tree[k]
    return tree


# ----------------------------------------------------------------------------------------------
# Architecture from the tensors (and the config for what they cannot tell).


def _count(state: Mapping[str, Any], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m[1]) for k in state if (m := pattern.match(k))}
    if not found:
        raise ValueError(f"no keys {prefix}N.* in the checkpoint")
    return max(found) + 1


def _shape(state: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if key not in state:
        raise ValueError(f"missing key {key} (needed to infer the architecture)")
    return tuple(state[key].shape)


def _cfg(cfg: Mapping[str, Any], dotted: str, default: Any) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def model_from_state(state: Mapping[str, Any], cfg: Mapping[str, Any] | None = None) -> Segmentor:
    """The ``Segmentor`` an official ``state_dict`` describes. ``cfg``: the run's mmengine config
    as a dict (``meta["cfg"]``), for head counts, ``lora_alpha`` and ``out_indices``."""
    cfg = cfg or {}
    backbone = {
        k[len("backbone.") :]: v
        for k, v in state.items()
        if k.startswith("backbone.") and ".lora_" not in k
    }
    if "cls_token" not in backbone:
        raise ValueError("no backbone.cls_token: not a checkpoint of the official DINOv2 model")
    arch = convert.infer_arch(backbone, "fair")
    alpha = float(_cfg(cfg, "model.backbone.lora_alpha", OFFICIAL["lora_alpha"]))
    layout = []  # in the official key order, whatever the file's order
    for fair, layout_kind in convert.fair_keys(arch):
        layer = f"backbone.{fair.removesuffix('.weight')}"
        ranks = [
            (ours, state[f"{layer}.lora_A_{official}"].shape[0])
            for official, ours in _ADAPTERS.items()
            if layout_kind == "linear" and f"{layer}.lora_A_{official}" in state
        ]
        if not ranks:
            continue
        path = "/".join(convert.flax_path(fair, layout_kind)[:-1])
        layout.append((path, AdapterSpec(tuple(ranks), alpha / sum(r for _, r in ranks))))
    default_blocks = OFFICIAL["out_indices"]
    if max(default_blocks) >= arch.depth:
        default_blocks = convert.default_out_indices(arch.depth)
    offset, antialias = convert.default_interpolation(arch)
    dino = DinoV2(
        arch,
        out_indices=tuple(_cfg(cfg, "model.backbone.out_indices", default_blocks)),
        interpolate_offset=offset,
        interpolate_antialias=antialias,
        adapters=tuple(layout),
    )
    return Segmentor(dino, _head_from_state(state, cfg))


def _head_from_state(state: Mapping[str, Any], cfg: Mapping[str, Any]) -> Mask2FormerHead:
    head = "model.decode_head."
    enc_heads = _cfg(
        cfg, head + "pixel_decoder.encoder.layer_cfg.self_attn_cfg.num_heads", OFFICIAL["num_heads"]
    )
    dec_heads = _cfg(
        cfg, head + "transformer_decoder.layer_cfg.cross_attn_cfg.num_heads", OFFICIAL["num_heads"]
    )
    if enc_heads != dec_heads:
        raise ValueError(f"encoder heads {enc_heads} != decoder heads {dec_heads}: one count here")
    groups = _cfg(cfg, head + "pixel_decoder.norm_cfg.num_groups", GN_GROUPS)
    if groups != GN_GROUPS:
        raise ValueError(f"GroupNorm with {groups} groups; this head uses {GN_GROUPS}")
    queries, dim = _shape(state, "decode_head.query_feat.weight")
    pd, td = "decode_head.pixel_decoder.encoder.layers.", "decode_head.transformer_decoder.layers."
    weights = _shape(state, pd + "0.self_attn.attention_weights.weight")[0]
    points, rest = divmod(weights, enc_heads * NUM_LEVELS)
    if rest:
        raise ValueError(f"attention_weights rows {weights} != {enc_heads} heads x 3 levels x N")
    for name in ("level_embed", "pixel_decoder.level_encoding"):
        levels = _shape(state, f"decode_head.{name}.weight")[0]
        if levels != NUM_LEVELS:
            raise ValueError(f"decode_head.{name} has {levels} levels; this head uses {NUM_LEVELS}")
    return Mask2FormerHead(
        num_classes=_shape(state, "decode_head.cls_embed.weight")[0] - 1,
        dim=dim,
        num_queries=queries,
        num_heads=enc_heads,
        encoder_layers=_count(state, pd),
        encoder_ffn_dim=_shape(state, pd + "0.ffn.layers.0.0.weight")[0],
        num_points=points,
        decoder_layers=_count(state, td),
        decoder_ffn_dim=_shape(state, td + "0.ffn.layers.0.0.weight")[0],
    )


# ----------------------------------------------------------------------------------------------
# mmengine config text (``meta["cfg"]``), read as data: literals, dict(...), names, + and *.

_BINOPS = {ast.Add: lambda a, b: a + b, ast.Mult: lambda a, b: a * b, ast.Sub: lambda a, b: a - b}


def parse_config_text(text: str) -> dict[str, Any]:
    """The top-level assignments of an mmengine config file; nothing in it is executed.
    Values it cannot read (imports, function calls other than ``dict``) are left out."""
    scope: dict[str, Any] = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
            try:
                value = _literal(node.value, scope)
            except ValueError:
                continue
            for target in node.targets:
                scope[target.id] = value
    return scope


def _literal(node: ast.AST, scope: Mapping[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and node.id in scope:
        return scope[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_literal(e, scope) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict) and None not in node.keys:
        pairs = zip(node.keys, node.values, strict=True)
        return {_literal(k, scope): _literal(v, scope) for k, v in pairs}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        if node.args or any(k.arg is None for k in node.keywords):
            raise ValueError("dict(...) with positional or ** arguments")
        return {k.arg: _literal(k.value, scope) for k in node.keywords}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_literal(node.operand, scope)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_literal(node.left, scope), _literal(node.right, scope))
    raise ValueError(f"not a literal: {ast.dump(node)[:60]}")


def config_text(model: Segmentor) -> str:
    """The part of an official config this model needs to be rebuilt (``meta["cfg"]``)."""
    spec = next((s for _, s in model.backbone.adapters), None)
    alpha = spec.scale * spec.total_rank if spec else OFFICIAL["lora_alpha"]
    h = model.head
    attn = f"dict(num_heads={h.num_heads}, num_points={h.num_points})"
    return (
        f"model = dict(\n"
        f"    backbone=dict(out_indices={tuple(model.backbone.out_indices)!r}, "
        f"lora_alpha={alpha!r}),\n"
        f"    decode_head=dict(\n"
        f"        num_classes={h.num_classes},\n"
        f"        pixel_decoder=dict(encoder=dict(layer_cfg=dict(self_attn_cfg={attn}))),\n"
        f"        transformer_decoder=dict(\n"
        f"            layer_cfg=dict(cross_attn_cfg=dict(num_heads={h.num_heads}))),\n"
        f"    ),\n"
        f")\n"
    )


# ----------------------------------------------------------------------------------------------
# Files.


def read_official(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(state dict, config dict) of an official checkpoint: an mmengine ``.pth`` (a ``module.``
    prefix from distributed training is dropped), a bare state dict, or ``.safetensors``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".safetensors":
        state, meta = safetensors_file.load(path)
        text = meta.get("cfg", "")
    else:
        obj = load_pth(path, opaque=True)
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path}: expected a checkpoint dict, got {type(obj).__name__}")
        state = obj.get("state_dict", obj)
        meta = obj.get("meta") if isinstance(obj.get("meta"), Mapping) else {}
        text = meta.get("cfg", "")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    bad = sorted(k for k, v in state.items() if not isinstance(v, np.ndarray))
    if bad:
        raise ValueError(f"{path}: state_dict entries that are not tensors: {bad[:5]}")
    cfg = text if isinstance(text, Mapping) else parse_config_text(text) if text else {}
    return state, dict(cfg)


def load_mmseg_checkpoint(path: str | Path) -> tuple[Segmentor, Params]:
    """``(model, params)`` of an official checkpoint; ``model.apply({"params": params}, images,
    method=Segmentor.predict)`` gives mmseg's semantic scores for normalised RGB images."""
    state, cfg = read_official(path)
    try:
        model = model_from_state(state, cfg)
        return model, from_official(model, state)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def save_mmseg_checkpoint(
    path: str | Path, model: Segmentor, params: Params, *, merged: bool = False
) -> None:
    """Write ``model`` in the official layout: ``.pth`` (``{"meta": {"cfg"}, "state_dict"}``,
    loadable by mmengine's ``load_checkpoint`` and ``torch.load(weights_only=True)``) or
    ``.safetensors`` (through ``safetensors_file``); either appears whole, with the umask's
    permissions. ``merged``: fold the adapters into the kernels (a plain backbone, as the
    official code runs in eval mode); else keep them, the kernel holding the residual."""
    if merged and model.backbone.adapters:
        params = {**params, "backbone": merge(params["backbone"], model.backbone.adapters)}
        model = model.clone(backbone=model.backbone.clone(adapters=()))
    state, text = to_official(model, params), config_text(model)
    path = Path(path)
    if path.suffix == ".safetensors":
        safetensors_file.save(path, dict(state), {"cfg": text})
    elif path.suffix in (".pth", ".pt"):
        write_pth(path, {"meta": {"cfg": text}, "state_dict": state})
    else:
        raise ValueError(f"{path}: expected a .pth or .safetensors name")
