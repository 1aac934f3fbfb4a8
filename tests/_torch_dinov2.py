"""Reference DINOv2 models for the parity tests: `transformers` PyTorch modules, random weights.

Also writes the same weights in every checkpoint layout the importer reads: the HF hub naming
(`save_pretrained`), the transformers>=5 in-memory naming, and the official FAIR `.pth` layout
(fused qkv / w12), the latter assembled here key by key from the official model definition.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import transformers

from recyclelora_jax.models.dinov2 import ARCHS

# The project's tiny model (``ARCHS["tiny"]``: head size 64 as in every DINOv2 model, so the
# head count is inferable from the tensors) with 3 blocks and a 4x4 position grid: the parity
# images of 32 px are then the pretrained grid, and 40x24 or 72x48 px interpolate it.
_ARCH = dataclasses.replace(ARCHS["tiny"], depth=3, pos_grid=4)
TINY = dict(
    hidden_size=_ARCH.embed_dim,
    num_hidden_layers=_ARCH.depth,
    num_attention_heads=_ARCH.num_heads,
    image_size=_ARCH.pos_grid * _ARCH.patch_size,
    patch_size=_ARCH.patch_size,
)


def reference_model(kind: str = "plain", seed: int = 0) -> torch.nn.Module:
    """A tiny `Dinov2Model` (`kind` plain/swiglu) or `Dinov2WithRegistersModel` (registers),
    every parameter random so that LayerScale, biases and norms all matter."""
    torch.manual_seed(seed)
    if kind == "registers":
        config = transformers.Dinov2WithRegistersConfig(**TINY, num_register_tokens=4)
        model = transformers.Dinov2WithRegistersModel(config)
    else:
        config = transformers.Dinov2Config(**TINY, use_swiglu_ffn=kind == "swiglu")
        model = transformers.Dinov2Model(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = name.endswith("weight") and ("norm" in name)
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if is_norm_scale else 0.0))
    return model.eval()


def run_reference(model: torch.nn.Module, images: np.ndarray) -> tuple[np.ndarray, list]:
    """(last_hidden_state, [output of block i for each block]) for NHWC `images`."""
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        out = model(pixels, output_hidden_states=True)
    return out.last_hidden_state.numpy(), [h.numpy() for h in out.hidden_states[1:]]


def save_hub(model: torch.nn.Module, directory: Path) -> Path:
    """`save_pretrained`: the naming of the published hub files (attention.attention.query...)."""
    model.save_pretrained(directory)
    return directory / "model.safetensors"


def save_transformers5(model: torch.nn.Module, directory: Path) -> Path:
    """The module's own `state_dict` (transformers>=5 naming: q_proj, gate_proj...) + config."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, str(path))
    (directory / "config.json").write_text(json.dumps(model.config.to_dict()))
    return path


def fair_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The same weights under the official `DinoVisionTransformer` key names and layout."""
    sd = model.state_dict()
    emb = "embeddings."
    out = {
        "cls_token": sd[emb + "cls_token"],
        "mask_token": sd[emb + "mask_token"],
        "pos_embed": sd[emb + "position_embeddings"],
        "patch_embed.proj.weight": sd[emb + "patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd[emb + "patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    if emb + "register_tokens" in sd:
        out["register_tokens"] = sd[emb + "register_tokens"]
    for i in range(model.config.num_hidden_layers):
        hf, fb = f"encoder.layer.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{fb}norm1.{p}"] = sd[f"{hf}norm1.{p}"]
            out[f"{fb}norm2.{p}"] = sd[f"{hf}norm2.{p}"]
            qkv = [sd[f"{hf}attention.{n}_proj.{p}"] for n in "qkv"]
            out[f"{fb}attn.qkv.{p}"] = torch.cat(qkv, 0)
            out[f"{fb}attn.proj.{p}"] = sd[f"{hf}attention.o_proj.{p}"]
            if model.config.use_swiglu_ffn:
                gate_up = [sd[f"{hf}mlp.{n}_proj.{p}"] for n in ("gate", "up")]
                out[f"{fb}mlp.w12.{p}"] = torch.cat(gate_up, 0)
                out[f"{fb}mlp.w3.{p}"] = sd[f"{hf}mlp.down_proj.{p}"]
            else:
                out[f"{fb}mlp.fc1.{p}"] = sd[f"{hf}mlp.fc1.{p}"]
                out[f"{fb}mlp.fc2.{p}"] = sd[f"{hf}mlp.fc2.{p}"]
        out[f"{fb}ls1.gamma"] = sd[f"{hf}layer_scale1.lambda1"]
        out[f"{fb}ls2.gamma"] = sd[f"{hf}layer_scale2.lambda1"]
    return out


def use_official_interpolation(model: torch.nn.Module, offset: float = 0.1) -> None:
    """Swap the model's position interpolation for the official DINOv2 rule:
    `F.interpolate(scale_factor=((h + offset) / N, (w + offset) / N), mode="bicubic")`."""
    emb = model.embeddings

    def interpolate(embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        pos = emb.position_embeddings
        n_pos = pos.shape[1] - 1
        if embeddings.shape[1] - 1 == n_pos and height == width:
            return pos
        grid = math.isqrt(n_pos)
        h, w = height // emb.patch_size, width // emb.patch_size
        patch = pos[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        patch = torch.nn.functional.interpolate(
            patch, scale_factor=((h + offset) / grid, (w + offset) / grid), mode="bicubic"
        )
        assert patch.shape[-2:] == (h, w)
        return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, h * w, -1)], 1)

    emb.interpolate_pos_encoding = interpolate


def official_vit_14px(c: int = 64, hidden: int = 256, seed: int = 0) -> dict[str, torch.Tensor]:
    """A one-block official FAIR state dict with the real 14-px patch and 37x37 position grid."""
    torch.manual_seed(seed)
    sd = {
        "cls_token": torch.randn(1, 1, c),
        "mask_token": torch.zeros(1, c),
        "pos_embed": torch.randn(1, 1 + 37 * 37, c),
        "patch_embed.proj.weight": 0.1 * torch.randn(c, 3, 14, 14),
        "patch_embed.proj.bias": torch.randn(c),
        "norm.weight": torch.randn(c),
        "norm.bias": torch.randn(c),
    }
    linear = {"attn.qkv": (3 * c, c), "attn.proj": (c, c)}
    linear.update({"mlp.fc1": (hidden, c), "mlp.fc2": (c, hidden)})
    for name, shape in linear.items():
        sd[f"blocks.0.{name}.weight"] = torch.randn(shape)
        sd[f"blocks.0.{name}.bias"] = torch.randn(shape[0])
    for norm in ("norm1", "norm2"):
        sd[f"blocks.0.{norm}.weight"], sd[f"blocks.0.{norm}.bias"] = torch.randn(2, c)
    sd["blocks.0.ls1.gamma"], sd["blocks.0.ls2.gamma"] = torch.randn(2, c)
    return sd
