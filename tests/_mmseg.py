"""The official model for the interop tests: mmseg's real ``EncoderDecoder`` and
``Mask2FormerHead`` (mmdet's decoders, mmcv's deformable attention) at tiny sizes, on a tiny
DINOv2 written here in the official module layout (``backbone.blocks.N.attn.qkv.lora_A_main``…)
whose adapted linear layers compute ``W_res x + b + s (B_main A_main + B_sub A_sub) x``.

mmcv-lite has no compiled ``mmcv._ext``; a stand-in module whose kernels raise when called lets
``mmcv.ops`` import unmodified, and on CPU tensors mmcv's ``MultiScaleDeformableAttention`` takes
its pure-PyTorch path (a kernel call would fail loudly).
"""

from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F
from torch import nn


def _install_ext_stand_in() -> None:
    if "mmcv._ext" in sys.modules:
        return
    ext = types.ModuleType("mmcv._ext")

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def kernel(*args, **kwargs):
            raise RuntimeError(f"mmcv._ext.{name}: compiled mmcv kernels are not installed")

        return kernel

    ext.__getattr__ = __getattr__
    sys.modules["mmcv._ext"] = ext


_install_ext_stand_in()

import mmseg.models  # noqa: E402, F401  (registers mmseg's and, through it, mmdet's modules)
from mmengine.config import Config, ConfigDict  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402

WIDTH, DEPTH, PATCH, GRID = 128, 4, 8, 4  # heads of 64 as in DINOv2; 32-px images
OUT_INDICES = (0, 1, 2, 3)
NUM_CLASSES, DIM, HEADS, POINTS = 5, 32, 4, 2


class LoRALinear(nn.Linear):
    """``nn.Linear`` with the official ``RecycleLoRALinear`` parameters and training forward."""

    def __init__(self, n_in: int, n_out: int, r_main: int, r_sub: int, alpha: float):
        super().__init__(n_in, n_out)
        self.r_main, self.r_sub = r_main, r_sub
        self.scaling = alpha / (r_main + r_sub) if r_main + r_sub else 0.0
        if r_main:
            self.lora_A_main = nn.Parameter(torch.zeros(r_main, n_in))
            self.lora_B_main = nn.Parameter(torch.zeros(n_out, r_main))
        if r_sub:
            self.lora_A_sub = nn.Parameter(torch.zeros(r_sub, n_in))
            self.lora_B_sub = nn.Parameter(torch.zeros(n_out, r_sub))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.r_main:
            y = y + (x @ self.lora_A_main.T @ self.lora_B_main.T) * self.scaling
        if self.r_sub:
            y = y + (x @ self.lora_A_sub.T @ self.lora_B_sub.T) * self.scaling
        return y


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, linear):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, linear(dim, 3 * dim), linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, linear):
        super().__init__()
        self.fc1, self.fc2 = linear(dim, 4 * dim), linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, linear):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = _Attention(dim, heads, linear), _Mlp(dim, linear)
        self.ls1, self.ls2 = _LayerScale(dim), _LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


@MODELS.register_module(force=True)
class TinyOfficialDinoV2(nn.Module):
    """The official backbone's layout and forward (images of the position grid's size): block
    outputs at ``out_indices`` without the CLS token, resized x4, x2, x1, x0.5 (bilinear)."""

    def __init__(
        self,
        r_main: int = 0,
        r_sub: int = 0,
        lora_alpha: float = 1.0,
        out_indices=OUT_INDICES,
        init_cfg=None,
    ):
        super().__init__()
        linear = lambda i, o: LoRALinear(i, o, r_main, r_sub, lora_alpha)
        self.out_indices = tuple(out_indices)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, WIDTH, PATCH, PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.pos_embed = nn.Parameter(torch.zeros(1, GRID * GRID + 1, WIDTH))
        self.mask_token = nn.Parameter(torch.zeros(1, WIDTH))
        self.blocks = nn.ModuleList(_Block(WIDTH, WIDTH // 64, linear) for _ in range(DEPTH))
        self.norm = nn.LayerNorm(WIDTH, eps=1e-6)

    def init_weights(self) -> None:
        pass

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        b, _, h, w = images.shape
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], 1) + self.pos_embed
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.out_indices:
                feats.append(x[:, 1:].transpose(1, 2).reshape(b, WIDTH, h // PATCH, w // PATCH))
        return [
            F.interpolate(f, scale_factor=s, mode="bilinear", align_corners=False) if s != 1 else f
            for f, s in zip(feats, (4, 2, 1, 0.5), strict=True)
        ]


def head_config(decoder_layers: int = 3) -> dict:
    """The official ``decode_head`` config at tiny sizes (same structure and options)."""
    attn = dict(embed_dims=DIM, num_heads=HEADS, attn_drop=0.0, proj_drop=0.0, batch_first=True)
    ffn = dict(
        embed_dims=DIM,
        feedforward_channels=64,
        num_fcs=2,
        ffn_drop=0.0,
        act_cfg=dict(type="ReLU", inplace=True),
    )
    return dict(
        type="Mask2FormerHead",
        in_channels=[WIDTH] * 4,
        strides=[4, 8, 16, 32],
        feat_channels=DIM,
        out_channels=DIM,
        num_classes=NUM_CLASSES,
        num_queries=7,
        num_transformer_feat_level=3,
        align_corners=False,
        pixel_decoder=dict(
            type="mmdet.MSDeformAttnPixelDecoder",
            num_outs=3,
            norm_cfg=dict(type="GN", num_groups=32),
            act_cfg=dict(type="ReLU"),
            encoder=dict(
                num_layers=2,
                layer_cfg=dict(
                    self_attn_cfg=dict(
                        embed_dims=DIM,
                        num_heads=HEADS,
                        num_levels=3,
                        num_points=POINTS,
                        im2col_step=64,
                        dropout=0.0,
                        batch_first=True,
                        norm_cfg=None,
                    ),
                    ffn_cfg=ffn,
                ),
            ),
            positional_encoding=dict(num_feats=DIM // 2, normalize=True),
        ),
        positional_encoding=dict(num_feats=DIM // 2, normalize=True),
        transformer_decoder=dict(
            return_intermediate=True,
            num_layers=decoder_layers,
            layer_cfg=dict(
                self_attn_cfg=attn, cross_attn_cfg=attn, ffn_cfg=dict(ffn, add_identity=True)
            ),
        ),
        loss_cls=dict(
            type="mmdet.CrossEntropyLoss",
            use_sigmoid=False,
            loss_weight=2.0,
            class_weight=[1.0] * NUM_CLASSES + [0.1],
        ),
        loss_mask=dict(type="mmdet.CrossEntropyLoss", use_sigmoid=True, loss_weight=5.0),
        loss_dice=dict(
            type="mmdet.DiceLoss",
            use_sigmoid=True,
            activate=True,
            naive_dice=True,
            eps=1.0,
            loss_weight=5.0,
        ),
        train_cfg=dict(
            num_points=64,
            oversample_ratio=3.0,
            importance_sample_ratio=0.75,
            assigner=dict(
                type="mmdet.HungarianAssigner",
                match_costs=[
                    dict(type="mmdet.ClassificationCost", weight=2.0),
                    dict(type="mmdet.CrossEntropyLossCost", weight=5.0, use_sigmoid=True),
                    dict(type="mmdet.DiceCost", weight=5.0, pred_act=True, eps=1.0),
                ],
            ),
            sampler=dict(type="mmdet.MaskPseudoSampler"),
        ),
    )


def official_config(r_main: int = 4, r_sub: int = 2, lora_alpha: float = 1.0) -> Config:
    """An mmengine ``Config`` shaped like the official one (its ``pretty_text`` is what mmengine
    stores as ``meta["cfg"]``)."""
    return Config(
        dict(
            crop_size=(32, 32),
            model=dict(
                type="EncoderDecoder",
                backbone=dict(
                    type="TinyOfficialDinoV2",
                    r_main=r_main,
                    r_sub=r_sub,
                    lora_alpha=lora_alpha,
                    out_indices=OUT_INDICES,
                ),
                decode_head=head_config(),
                train_cfg=dict(),
                test_cfg=dict(mode="slide", crop_size=(32, 32), stride=(21, 21)),
            ),
        )
    )


def build(cfg: Config) -> nn.Module:
    """The mmseg ``EncoderDecoder`` of ``cfg`` in eval mode, mmdet's init applied."""
    model = MODELS.build(ConfigDict(cfg.model))
    model.init_weights()
    return model.eval()


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Every parameter random (adapters and LayerScale included) at a trained network's scale:
    matrices ~ N(0, 1/fan_in), vectors ~ N(0, 0.1^2) (norm and LayerScale scales around 1), so
    that no mapped tensor can be wrong unnoticed and activations stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
                continue
            is_scale = name.endswith("weight") and (".norm" in name or ".gn." in name)
            p.copy_(noise * 0.1 + (1.0 if is_scale or name.endswith("gamma") else 0.0))
