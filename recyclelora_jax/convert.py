"""Pretrained DINOv2 import: official ``.pth``, HF ``model.safetensors``, or a converted file.

Every checkpoint naming is described as a table from the Flax parameter path to the checkpoint
keys that make it up (``qkv`` is fused from ``query/key/value`` or ``q/k/v_proj``, SwiGLU's
``w12`` from ``gate/up_proj``), built from the architecture inferred from the tensors. The same
table drives the strict check (every key used, every shape right) and the conversion, so the
error for a bad file names the checkpoint's own keys.

Command line: ``python -m recyclelora_jax.convert SRC DST [--patch-size 16 --pos-grid 32]``
writes a converted safetensors file that :func:`load_dinov2` reads in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from recyclelora_jax import model_io, safetensors_file
from recyclelora_jax.models.dinov2 import DEFAULT_OUT_INDICES, DinoV2, DinoV2Arch
from recyclelora_jax.models.resize import torch_interpolate
from recyclelora_jax.pth import read_pth

FORMAT_TAG = "recyclelora_jax.dinov2"
HEAD_DIM = 64  # every DINOv2 model has 64-dimensional heads

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One Flax parameter: the checkpoint keys concatenated (dim 0) into it, and their layout."""

    target: tuple[str, ...]
    sources: tuple[str, ...]
    layout: str  # "linear" (out, in), "conv" (O, I, H, W), or "plain" (stored as in Flax)


# ----------------------------------------------------------------------------------------------
# Namings. Each maps an official (FAIR) key to the tuple of keys that hold it in a checkpoint.


def _fair(key: str) -> tuple[str, ...]:
    return (key,)


_HF_TOP = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings",
    "register_tokens": "embeddings.register_tokens",
    "patch_embed.proj": "embeddings.patch_embeddings.projection",
    "norm": "layernorm",
}
# Per-block module renames; a tuple means fused parts in order.
_HF_BLOCK = {
    "hub": {
        "attn.qkv": (
            "attention.attention.query",
            "attention.attention.key",
            "attention.attention.value",
        ),
        "attn.proj": ("attention.output.dense",),
        "mlp.w12": ("mlp.weights_in",),
        "mlp.w3": ("mlp.weights_out",),
    },
    "transformers5": {
        "attn.qkv": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
        "attn.proj": ("attention.o_proj",),
        "mlp.w12": ("mlp.gate_proj", "mlp.up_proj"),
        "mlp.w3": ("mlp.down_proj",),
    },
}
_HF_COMMON_BLOCK = {"ls1.gamma": ("layer_scale1.lambda1",), "ls2.gamma": ("layer_scale2.lambda1",)}


def _hf(style: str) -> Callable[[str], tuple[str, ...]]:
    """The HF naming ``style`` as a map from an official key to its checkpoint key(s)."""
    renames = _HF_BLOCK[style]

    def sources(key: str) -> tuple[str, ...]:
        block = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if block is None:
            module, _, leaf = key.rpartition(".")
            if key in _HF_TOP:
                return (_HF_TOP[key],)
            return (f"{_HF_TOP[module]}.{leaf}",)
        prefix, rest = f"encoder.layer.{block[1]}.", block[2]
        if rest in _HF_COMMON_BLOCK:
            return tuple(prefix + s for s in _HF_COMMON_BLOCK[rest])
        module, _, leaf = rest.rpartition(".")
        return tuple(f"{prefix}{m}.{leaf}" for m in renames.get(module, (module,)))

    return sources


_NAMINGS = {"fair": _fair, "hf-hub": _hf("hub"), "hf-transformers5": _hf("transformers5")}


def detect_naming(keys: Sequence[str]) -> str:
    """Which key naming a checkpoint uses: ``fair``, ``hf-hub`` or ``hf-transformers5``."""
    keys = set(keys)
    if "cls_token" in keys:
        return "fair"
    if "embeddings.cls_token" in keys:
        if any(".attention.q_proj." in k or ".mlp.gate_proj." in k for k in keys):
            return "hf-transformers5"
        return "hf-hub"
    raise ValueError(
        f"not a DINOv2 checkpoint: neither 'cls_token' nor 'embeddings.cls_token' among its "
        f"{len(keys)} keys (first: {sorted(keys)[:5]})"
    )


# ----------------------------------------------------------------------------------------------
# The official key list of an architecture, and its Flax counterpart.


def fair_keys(arch: DinoV2Arch) -> list[tuple[str, str]]:
    """``(official key, layout)`` of every parameter of ``arch``."""
    keys = [("cls_token", "plain"), ("mask_token", "plain"), ("pos_embed", "plain")]
    if arch.num_register_tokens:
        keys.append(("register_tokens", "plain"))
    keys += [("patch_embed.proj.weight", "conv"), ("patch_embed.proj.bias", "plain")]
    ffn = ("mlp.w12", "mlp.w3") if arch.ffn == "swiglu" else ("mlp.fc1", "mlp.fc2")
    for i in range(arch.depth):
        b = f"blocks.{i}."
        for norm in ("norm1", "norm2"):
            keys += [(f"{b}{norm}.weight", "plain"), (f"{b}{norm}.bias", "plain")]
        for dense in ("attn.qkv", "attn.proj", *ffn):
            keys += [(f"{b}{dense}.weight", "linear"), (f"{b}{dense}.bias", "plain")]
        keys += [(f"{b}ls1.gamma", "plain"), (f"{b}ls2.gamma", "plain")]
    return [*keys, ("norm.weight", "plain"), ("norm.bias", "plain")]


def flax_path(fair_key: str, layout: str) -> tuple[str, ...]:
    """``blocks.3.attn.qkv.weight`` -> ``("blocks_3", "attn", "qkv", "kernel")``."""
    parts = re.sub(r"^blocks\.(\d+)", r"blocks_\1", fair_key).split(".")
    if parts[:2] == ["patch_embed", "proj"]:
        parts = ["patch_embed", *parts[2:]]
    if parts[-1] == "weight":
        parts[-1] = "kernel" if layout in ("linear", "conv") else "scale"
    return tuple(parts)


def entries(arch: DinoV2Arch, naming: str) -> list[Entry]:
    """The conversion table of ``arch`` for a checkpoint ``naming`` (or ``converted``)."""
    table = []
    for key, layout in fair_keys(arch):
        target = flax_path(key, layout)
        if naming == "converted":
            table.append(Entry(target, ("/".join(target),), "plain"))
        else:
            table.append(Entry(target, _NAMINGS[naming](key), layout))
    return table


def to_torch_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """The PyTorch shape of a Flax parameter of ``shape`` stored with ``layout``."""
    if layout == "linear":
        return shape[::-1]
    if layout == "conv":
        h, w, i, o = shape
        return (o, i, h, w)
    return shape


def from_torch(array: np.ndarray, layout: str) -> np.ndarray:
    """A PyTorch tensor (as numpy) in Flax layout: Linear (out, in) -> (in, out), conv OIHW ->
    HWIO."""
    if layout == "linear":
        return array.T
    if layout == "conv":
        return array.transpose(2, 3, 1, 0)
    return array


def to_torch(array: np.ndarray, layout: str) -> np.ndarray:
    """The inverse of :func:`from_torch`."""
    if layout == "linear":
        return array.T
    if layout == "conv":
        return array.transpose(3, 2, 0, 1)
    return array


# ----------------------------------------------------------------------------------------------
# Architecture inference.


def _fused_shape(tensors: dict[str, np.ndarray], sources: tuple[str, ...], what: str) -> tuple:
    missing = [s for s in sources if s not in tensors]
    if missing:
        raise ValueError(f"cannot infer the {what}: missing key(s) {missing}")
    shapes = [tensors[s].shape for s in sources]
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def infer_arch(tensors: dict[str, np.ndarray], naming: str) -> DinoV2Arch:
    """The architecture of a checkpoint, from its tensors alone (heads = width / 64)."""
    src = _NAMINGS[naming]
    width = _fused_shape(tensors, src("cls_token"), "width")[-1]
    patch = _fused_shape(tensors, src("patch_embed.proj.weight"), "patch size")[-1]
    n_pos = _fused_shape(tensors, src("pos_embed"), "position grid")[1] - 1
    grid = math.isqrt(n_pos)
    if grid * grid != n_pos:
        raise ValueError(f"position embedding has {n_pos} patch positions, not a square grid")
    block_re = r"blocks\.(\d+)\." if naming == "fair" else r"encoder\.layer\.(\d+)\."
    blocks = {int(m[1]) for k in tensors if (m := re.match(block_re, k))}
    if not blocks:
        raise ValueError("no transformer blocks found (keys like 'blocks.0.' / 'encoder.layer.0.')")
    swiglu = all(s in tensors for s in src("blocks.0.mlp.w12.weight"))
    if swiglu:
        hidden = _fused_shape(tensors, src("blocks.0.mlp.w12.weight"), "FFN width")[0] // 2
    else:
        hidden = _fused_shape(tensors, src("blocks.0.mlp.fc1.weight"), "FFN width")[0]
    registers = 0
    if all(s in tensors for s in src("register_tokens")):
        registers = _fused_shape(tensors, src("register_tokens"), "registers")[1]
    if width % HEAD_DIM:
        raise ValueError(f"width {width} is not a multiple of DINOv2's head size {HEAD_DIM}")
    arch = DinoV2Arch(
        embed_dim=width,
        depth=max(blocks) + 1,
        num_heads=width // HEAD_DIM,
        patch_size=patch,
        pos_grid=grid,
        ffn="swiglu" if swiglu else "mlp",
        num_register_tokens=registers,
    )
    if arch.mlp_hidden != hidden:
        arch = dataclasses.replace(arch, ffn_hidden=hidden)
    return arch


def apply_hf_config(arch: DinoV2Arch, config: dict[str, Any], where: Path) -> DinoV2Arch:
    """Cross-check ``arch`` against a transformers ``config.json`` and take its head count."""
    expect = {
        "hidden_size": arch.embed_dim,
        "num_hidden_layers": arch.depth,
        "patch_size": arch.patch_size,
        "use_swiglu_ffn": arch.ffn == "swiglu",
        "num_register_tokens": arch.num_register_tokens,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "qkv_bias": True,
    }
    bad = {k: (config[k], v) for k, v in expect.items() if k in config and config[k] != v}
    if bad:
        detail = ", ".join(f"{k}={c!r} but the tensors give {v!r}" for k, (c, v) in bad.items())
        raise ValueError(f"{where}: config disagrees with the checkpoint or DINOv2: {detail}")
    heads = config.get("num_attention_heads", arch.num_heads)
    if arch.embed_dim % heads:
        raise ValueError(f"{where}: num_attention_heads={heads} does not divide {arch.embed_dim}")
    return dataclasses.replace(arch, num_heads=heads)


# ----------------------------------------------------------------------------------------------
# Strict conversion.


def expected_shapes(arch: DinoV2Arch) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax parameter path -> shape, from ``jax.eval_shape`` (nothing is allocated)."""
    model = DinoV2(arch, out_indices=())
    size = arch.patch_size * arch.pos_grid
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    tree = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(p.key for p in path): tuple(leaf.shape) for path, leaf in flat}


def convert_tensors(
    tensors: dict[str, np.ndarray], arch: DinoV2Arch, naming: str, dtype: Any = np.float32
) -> Params:
    """Map checkpoint tensors onto the Flax tree of ``arch``; every key used, every shape right."""
    table = entries(arch, naming)
    shapes = expected_shapes(arch)
    used = {s for e in table for s in e.sources}
    missing = [s for e in table for s in e.sources if s not in tensors]
    unexpected = sorted(set(tensors) - used)
    wrong = []
    for e in table:
        full = to_torch_shape(shapes[e.target], e.layout)
        part = (full[0] // len(e.sources), *full[1:])
        wrong += [
            f"{s}: {tensors[s].shape} (expected {part})"
            for s in e.sources
            if s in tensors and tensors[s].shape != part
        ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if wrong:
        problems.append(f"wrong shapes [{'; '.join(wrong)}]")
    if problems:
        raise ValueError(f"checkpoint does not match {arch}: " + "; ".join(problems))

    params: Params = {}
    for e in table:
        parts = [np.asarray(tensors[s]) for s in e.sources]
        value = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        node = params
        for k in e.target[:-1]:
            node = node.setdefault(k, {})
        node[e.target[-1]] = jnp.asarray(from_torch(value, e.layout), dtype=dtype)
    return params


# ----------------------------------------------------------------------------------------------
# The reference's conversion for another resolution.


def resize_patch_and_pos(
    arch: DinoV2Arch, params: Params, patch_size: int, pos_grid: int
) -> tuple[DinoV2Arch, Params]:
    """Resize the patch kernel to ``patch_size``² and the position grid to ``pos_grid``², both
    with PyTorch bicubic (``align_corners=False``), keeping the CLS position: the reference's
    conversion of DINOv2 (14 px, 37×37) for 512-px crops (16 px, 32×32)."""
    kernel = params["patch_embed"]["kernel"]
    kernel = torch_interpolate(
        kernel.astype(jnp.float32), (0, 1), size=(patch_size, patch_size)
    ).astype(kernel.dtype)
    pos = params["pos_embed"]
    n, c = arch.pos_grid, pos.shape[-1]
    grid = pos[:, 1:].astype(jnp.float32).reshape(1, n, n, c)
    grid = torch_interpolate(grid, (1, 2), size=(pos_grid, pos_grid)).reshape(1, -1, c)
    pos = jnp.concatenate([pos[:, :1], grid.astype(pos.dtype)], axis=1)
    new = {**params, "patch_embed": {**params["patch_embed"], "kernel": kernel}, "pos_embed": pos}
    return dataclasses.replace(arch, patch_size=patch_size, pos_grid=pos_grid), new


# ----------------------------------------------------------------------------------------------
# Files.


def read_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and (safetensors) metadata of a ``.pth``/``.pt`` or ``.safetensors`` file."""
    if path.suffix in (".pth", ".pt"):
        return read_pth(path), {}
    if path.suffix == ".safetensors":
        return safetensors_file.load(path)
    raise ValueError(f"{path}: unknown checkpoint type (expected .pth, .pt or .safetensors)")


def default_out_indices(depth: int) -> tuple[int, ...]:
    """The reference's ViT-L blocks (7, 11, 15, 23) where they exist, else the last block of each
    quarter of the depth -- the first block for a quarter shorter than one block (depth < 4)."""
    if max(DEFAULT_OUT_INDICES) < depth:
        return DEFAULT_OUT_INDICES
    return tuple(max(depth * (k + 1) // 4 - 1, 0) for k in range(4))


def default_interpolation(arch: DinoV2Arch) -> tuple[float, bool]:
    """``(interpolate_offset, interpolate_antialias)`` of the official models of ``arch``:
    register models use the size form with antialiasing, the others the ``(n + 0.1) / N`` rule."""
    return (0.0, True) if arch.num_register_tokens else (0.1, False)


def load_dinov2(
    path: str | Path,
    *,
    interpolate_offset: float | None = None,
    interpolate_antialias: bool | None = None,
    patch_size: int | None = None,
    pos_grid: int | None = None,
    out_indices: Sequence[int] | None = None,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    remat: bool = False,
) -> tuple[DinoV2, Params]:
    """Load a DINOv2 checkpoint as ``(model, params)``.

    ``path``: an official ``.pth``, a HF ``model.safetensors`` (hub or transformers>=5 naming;
    a ``config.json`` beside it is cross-checked and gives the head count), a directory holding
    ``model.safetensors``, or a file written by :func:`save_converted`.

    Interpolation defaults follow the checkpoint: register models use the size form with
    antialiasing (``interpolate_offset=0.0, interpolate_antialias=True``, as the official hub
    and ``Dinov2WithRegistersModel``), the others the official ``(n + 0.1) / N`` rule; pass
    ``interpolate_offset=0.0`` for ``transformers.Dinov2Model``'s ``size`` form.
    ``patch_size``/``pos_grid`` apply :func:`resize_patch_and_pos` (16 and 32 for 512 px).
    ``out_indices`` default: blocks 7, 11, 15, 23 if the model is that deep, else the last
    block of each quarter (at least block 0).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    tensors, meta = read_checkpoint(path)
    try:
        if meta.get("format") == FORMAT_TAG:
            arch = DinoV2Arch(**json.loads(meta["arch"]))
            naming = "converted"
            offset, antialias = float(meta["interpolate_offset"]), meta["antialias"] == "True"
        else:
            naming = detect_naming(tensors)
            arch = infer_arch(tensors, naming)
            config = path.with_name("config.json")
            if naming != "fair" and config.is_file():
                arch = apply_hf_config(arch, json.loads(config.read_text()), config)
            offset, antialias = default_interpolation(arch)
        params = convert_tensors(tensors, arch, naming, param_dtype)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    if patch_size is not None or pos_grid is not None:
        arch, params = resize_patch_and_pos(
            arch, params, patch_size or arch.patch_size, pos_grid or arch.pos_grid
        )
    model = DinoV2(
        arch,
        out_indices=tuple(out_indices)
        if out_indices is not None
        else default_out_indices(arch.depth),
        interpolate_offset=offset if interpolate_offset is None else interpolate_offset,
        interpolate_antialias=antialias if interpolate_antialias is None else interpolate_antialias,
        remat=remat,
        dtype=dtype,
        param_dtype=param_dtype,
    )
    return model, params


def save_converted(path: str | Path, model: DinoV2, params: Params) -> None:
    """Write ``params`` with the architecture and interpolation settings of ``model`` to a
    safetensors file that :func:`load_dinov2` reads back without any conversion."""
    meta = {
        "format": FORMAT_TAG,
        "arch": json.dumps(dataclasses.asdict(model.arch)),
        "interpolate_offset": repr(float(model.interpolate_offset)),
        "antialias": str(bool(model.interpolate_antialias)),
    }
    model_io.save_tree(path, params, meta)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m recyclelora_jax.convert",
        description="Convert a DINOv2 checkpoint (official .pth or HF model.safetensors) into a "
        "safetensors file that recyclelora_jax.convert.load_dinov2 loads directly.",
    )
    parser.add_argument("src", type=Path, help="official .pth, HF model.safetensors, or its dir")
    parser.add_argument("dst", type=Path, help="output .safetensors")
    parser.add_argument(
        "--patch-size", type=int, help="resize the patch kernel (the reference uses 16 for 512 px)"
    )
    parser.add_argument(
        "--pos-grid", type=int, help="resize the position grid (the reference uses 32 for 512 px)"
    )
    parser.add_argument(
        "--interpolate-offset",
        type=float,
        help="on-the-fly position interpolation: 0.1 official rule, 0.0 size form "
        "(default: from the checkpoint type)",
    )
    parser.add_argument(
        "--interpolate-antialias",
        action=argparse.BooleanOptionalAction,
        help="antialiased interpolation (default: on for register models)",
    )
    args = parser.parse_args(argv)
    model, params = load_dinov2(
        args.src,
        interpolate_offset=args.interpolate_offset,
        interpolate_antialias=args.interpolate_antialias,
        patch_size=args.patch_size,
        pos_grid=args.pos_grid,
    )
    save_converted(args.dst, model, params)
    count = sum(x.size for x in jax.tree.leaves(params))
    print(f"{args.dst}: {model.arch}, {count:,} parameters")


if __name__ == "__main__":
    main()
