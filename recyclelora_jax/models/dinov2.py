"""DINOv2 vision transformer in Flax linen, faithful to facebookresearch/dinov2.

Parameter names follow the official checkpoints (``blocks_N/attn/qkv``, ``ls1/gamma``, ...), so
conversion is a transpose per tensor and the tree reads like the paper's code. PEFT needs that
per-block tree (SoMA adapts only blocks 8-23, rules select layers by path), so the blocks are
declared one by one; ``scan_layers`` runs each run of identical blocks as one ``lax.scan``
(`layer_scan`) over that same tree, which the TPU compiler compiles once instead of 24 times.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from recyclelora_jax.models.adapters import AdapterLayout, make_dense
from recyclelora_jax.models.layer_scan import scan_over_layers, signature, uniform_runs
from recyclelora_jax.models.resize import torch_interpolate

LN_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class DinoV2Arch:
    """The architecture hyper-parameters that a checkpoint determines."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int = 14
    pos_grid: int = 37  # pretrained position-embedding grid (518 / 14)
    mlp_ratio: float = 4.0
    ffn: str = "mlp"  # "mlp" (fc1-GELU-fc2) or "swiglu" (ViT-g)
    num_register_tokens: int = 0
    # FFN hidden width when a checkpoint does not follow the `mlp_ratio` rule; None = the rule.
    ffn_hidden: int | None = None

    @property
    def mlp_hidden(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        hidden = int(self.embed_dim * self.mlp_ratio)
        if self.ffn == "swiglu":  # two thirds, rounded up to a multiple of 8 (official rule)
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden


ARCHS: dict[str, DinoV2Arch] = {
    "vits14": DinoV2Arch(384, 12, 6),
    "vitb14": DinoV2Arch(768, 12, 12),
    "vitl14": DinoV2Arch(1024, 24, 16),
    "vitg14": DinoV2Arch(1536, 40, 24, ffn="swiglu"),
    # The project's one small ViT of DINOv2's shape (head size 64) for smoke runs, the demo,
    # tests and benchmarks: 64-px inputs on 8-px patches fill its position grid.
    "tiny": DinoV2Arch(128, 4, 2, patch_size=8, pos_grid=8),
}
ARCHS.update(
    {f"{k}_reg4": dataclasses.replace(v, num_register_tokens=4) for k, v in list(ARCHS.items())}
)

# Blocks whose outputs feed the segmentation head (RECIPE.md §3: blocks 8, 12, 16, 24 of ViT-L).
DEFAULT_OUT_INDICES = (7, 11, 15, 23)


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax attention over (B, heads, T, head_dim), statistics and normalisation in float32.

    Normalised after the value product (one (T, head_dim) divide instead of a (T, T) one, and a
    cheaper backward). On CPU this is 2-3x faster than `jax.nn.dot_product_attention`'s XLA
    path at 1300 tokens (measured in docs/DESIGN.md).
    """
    logits = ((q * q.shape[-1] ** -0.5) @ k.swapaxes(-1, -2)).astype(jnp.float32)
    weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
    out = jnp.matmul(weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / weights.sum(-1, keepdims=True)).astype(v.dtype)


# "reference" is `attention` above; "xla" and "cudnn" are `jax.nn.dot_product_attention`'s
# implementations; "pallas" is the Pallas TPU flash-attention kernel.
ATTENTION_IMPLS = ("auto", "reference", "xla", "cudnn", "pallas")
_FLASH_BLOCK = 128  # the Pallas kernel's sequence block: tokens are padded to a multiple


def resolve_attention(name: str, platform: str, dtype: Any) -> str:
    """``auto``: cuDNN flash attention on GPU for 16-bit inputs (XLA's otherwise), XLA's on TPU,
    `attention` on CPU (the fastest there). The Pallas kernel is opt-in (see `flash_attention`
    and the attention table in docs/BENCHMARKS.md)."""
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"attention={name!r} unknown; choose one of {ATTENTION_IMPLS}")
    if name != "auto":
        return name
    if platform == "gpu":
        return "cudnn" if jnp.dtype(dtype).itemsize == 2 else "xla"
    return "xla" if platform == "tpu" else "reference"


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """The Pallas TPU flash kernel over (B, heads, T, head_dim): (T, T) logits never reach HBM.

    A Mosaic kernel is not partitioned by the compiler, so under a mesh in context (the training
    step sets its own, `jax.sharding.use_abstract_mesh`) each device runs it on its share of the
    batch in a ``shard_map`` (the mesh's axes that divide B, in order; the project's meshes have
    no model axis to split the heads over).
    """
    mesh = jax.sharding.get_abstract_mesh()
    axes, share = [], 1
    for name in () if mesh.empty else mesh.axis_names:
        if mesh.shape[name] > 1 and q.shape[0] % (share * mesh.shape[name]) == 0:
            axes.append(name)
            share *= mesh.shape[name]
    if not axes:
        return _flash_kernel(q, k, v)
    spec = jax.sharding.PartitionSpec(tuple(axes))
    # check_vma=False: the kernel's outputs carry no per-device variance annotation.
    return jax.shard_map(
        _flash_kernel, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False
    )(q, k, v)


def _flash_kernel(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """`flash_attention` on one device. Tokens are padded to the kernel's block; padded keys
    sit in their own segment, so no real query attends to them."""
    from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash

    t = q.shape[2]
    pad = -t % _FLASH_BLOCK
    widths = ((0, 0), (0, 0), (0, pad), (0, 0))
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
    segment = jnp.broadcast_to(
        (jnp.arange(t + pad) >= t).astype(jnp.int32), q.shape[:1] + q.shape[2:3]
    )
    out = pallas_flash.flash_attention(
        q,
        k,
        v,
        segment_ids=pallas_flash.SegmentIds(segment, segment),
        sm_scale=q.shape[-1] ** -0.5,
    )
    return out[:, :, :t]


def multi_head_attention(qkv: jax.Array, impl: str) -> jax.Array:
    """(B, T, 3, heads, head_dim) projections -> (B, T, heads * head_dim) by ``impl``
    (a resolved name, see `resolve_attention`)."""
    b, t, _, heads, d = qkv.shape
    if impl in ("xla", "cudnn"):
        out = jax.nn.dot_product_attention(
            qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], implementation=impl
        )
        return out.reshape(b, t, heads * d)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # 3 x (B, heads, T, head_dim)
    fn = {"reference": attention, "pallas": flash_attention}[impl]
    return fn(q, k, v).transpose(0, 2, 1, 3).reshape(b, t, heads * d)


def gelu_exact(x: jax.Array) -> jax.Array:
    """Exact GELU, ``x/2 (1 + erf(x/√2))`` as PyTorch computes it; `jax.nn.gelu(approximate=
    False)` goes through ``erfc``, which XLA's CPU backend evaluates ~6x slower."""
    y = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # float32 inside the fusion
    return (0.5 * y * (1 + jax.lax.erf(y * 0.5**0.5))).astype(x.dtype)


def _dense(parent: Attention | Mlp, features: int, name: str) -> nn.Module:
    """A linear layer of `parent`, adapted where the adapter layout names its path."""
    path = f"{parent.prefix}/{name}"
    return make_dense(features, name, path, parent.adapters, parent.dtype, parent.param_dtype)


class Attention(nn.Module):
    num_heads: int
    prefix: str
    adapters: AdapterLayout
    dtype: Any
    param_dtype: Any
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, c = x.shape
        dense = functools.partial(_dense, self)
        qkv = dense(3 * c, "qkv")(x).reshape(b, t, 3, self.num_heads, c // self.num_heads)
        impl = resolve_attention(self.impl, jax.default_backend(), qkv.dtype)
        return dense(c, "proj")(multi_head_attention(qkv, impl))


class Mlp(nn.Module):
    hidden: int
    kind: str
    prefix: str
    adapters: AdapterLayout
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        dense = functools.partial(_dense, self)
        if self.kind == "swiglu":
            x1, x2 = jnp.split(dense(2 * self.hidden, "w12")(x), 2, axis=-1)
            return dense(c, "w3")(nn.silu(x1) * x2)
        if self.kind != "mlp":
            raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {self.kind!r}")
        return dense(c, "fc2")(gelu_exact(dense(self.hidden, "fc1")(x)))


class LayerScale(nn.Module):
    init_value: float
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gamma = self.param(
            "gamma", nn.initializers.constant(self.init_value), (x.shape[-1],), self.param_dtype
        )
        return x * gamma.astype(x.dtype)


class Block(nn.Module):
    arch: DinoV2Arch
    prefix: str
    adapters: AdapterLayout
    layerscale_init: float
    dtype: Any
    param_dtype: Any
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        norm = lambda name: nn.LayerNorm(
            LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        ls = lambda name: LayerScale(self.layerscale_init, self.param_dtype, name=name)
        common = dict(adapters=self.adapters, dtype=self.dtype, param_dtype=self.param_dtype)
        attn = Attention(
            self.arch.num_heads, f"{self.prefix}/attn", impl=self.attention, name="attn", **common
        )
        mlp = Mlp(self.arch.mlp_hidden, self.arch.ffn, f"{self.prefix}/mlp", name="mlp", **common)
        x = x + ls("ls1")(attn(norm("norm1")(x)))
        return x + ls("ls2")(mlp(norm("norm2")(x)))


# Floor of a channel's standard deviation in `standardize_image` (in units of the dataset
# normalisation's std, about 58/255): a near-flat image is not blown up into its noise.
IMAGE_STD_FLOOR = 0.1


def standardize_image(images: jax.Array) -> jax.Array:
    """Each image's channels (B, H, W, 3) to mean 0 and std 1 over its pixels, in float32."""
    x = images.astype(jnp.float32)
    mean = x.mean((1, 2), keepdims=True)
    std = jnp.sqrt(((x - mean) ** 2).mean((1, 2), keepdims=True))
    return ((x - mean) / jnp.maximum(std, IMAGE_STD_FLOOR)).astype(images.dtype)


class DinoV2(nn.Module):
    """DINOv2 ViT. Input: (B, H, W, 3) normalised images. Output: a dict of DINOv2's
    ``forward_features`` keys plus ``features``, the un-normed patch tokens of the blocks in
    ``out_indices`` as (B, H/p, W/p, C) maps.

    ``interpolate_offset`` 0.1 is the official on-the-fly position-embedding rule
    (``scale_factor=(n + 0.1) / N``); 0.0 is the ``size=(h, w)`` form of ``transformers``.
    ``interpolate_antialias`` matches the official flag (``Dinov2WithRegisters`` uses True).
    ``attention`` picks the implementation (`resolve_attention`; "auto" by backend).
    ``input_norm`` "image" first standardises each image's channels over its pixels (mean 0,
    std 1; `standardize_image`), so a per-channel affine colour cast of the input -- a change of
    lighting or white balance -- leaves the features unchanged; "dataset" (the official DINOv2)
    takes the normalised images as they are.
    """

    arch: DinoV2Arch
    out_indices: tuple[int, ...] = DEFAULT_OUT_INDICES
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    layerscale_init: float = 1e-5
    remat: bool = False
    scan_layers: bool = False  # identical blocks as one lax.scan (`_scanned_blocks`)
    dtype: Any = None  # compute dtype; None follows the input
    param_dtype: Any = jnp.float32
    adapters: AdapterLayout = ()
    attention: str = "auto"
    input_norm: str = "dataset"

    @nn.compact
    def __call__(self, images: jax.Array, masks: jax.Array | None = None) -> dict[str, jax.Array]:
        a, pd = self.arch, self.param_dtype
        self._check_attributes()
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (B, H, W, 3), got shape {images.shape}")
        dtype = self.dtype or images.dtype
        batch, height, width, _ = images.shape
        gh, gw = height // a.patch_size, width // a.patch_size
        if gh == 0 or gw == 0:
            raise ValueError(f"image {height}x{width} is smaller than one {a.patch_size}px patch")

        if self.input_norm == "image":
            images = standardize_image(images)
        elif self.input_norm != "dataset":
            raise ValueError(f"input_norm must be 'dataset' or 'image', got {self.input_norm!r}")
        x = self._tokens(images.astype(dtype), masks, gh, gw, height == width)
        blocks = self._scanned_blocks if self.scan_layers else self._blocks
        x, kept = blocks(x, dtype)
        n_prefix = 1 + a.num_register_tokens
        features = [k[:, n_prefix:].reshape(batch, gh, gw, a.embed_dim) for k in kept]

        x_norm = nn.LayerNorm(LN_EPS, dtype=dtype, param_dtype=pd, name="norm")(x)
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1:n_prefix],
            "x_norm_patchtokens": x_norm[:, n_prefix:],
            "x_prenorm": x,
            "features": features,
        }

    def _block(self, i: int, dtype: Any, cls: type[Block] = Block, **kwargs: Any) -> Block:
        args = (self.arch, f"blocks_{i}", self.adapters, self.layerscale_init, dtype)
        return cls(*args, self.param_dtype, self.attention, **kwargs)

    def _blocks(self, x: jax.Array, dtype: Any) -> tuple[jax.Array, list[jax.Array]]:
        """The unrolled loop: the last block's tokens and those after each of ``out_indices``."""
        cls = nn.remat(Block) if self.remat else Block
        kept = {}
        for i in range(self.arch.depth):
            x = self._block(i, dtype, cls, name=f"blocks_{i}")(x)
            if i in self.out_indices:
                kept[i] = x
        return x, [kept[i] for i in self.out_indices]

    def _scanned_blocks(self, x: jax.Array, dtype: Any) -> tuple[jax.Array, list[jax.Array]]:
        """`_blocks` as one scan per run of blocks with equal parameter shapes and adapters
        (one run for RecycleLoRA's 24 adapted blocks, two for SoMA's 8 + 16). The tokens after
        the ``out_indices`` blocks are written into a carried buffer (slot ``len(out)`` takes
        the others), so the loop holds one copy of them, not one per block. Initialisation
        takes the unrolled loop, which declares the per-block parameters."""
        if self.is_initializing():
            return self._blocks(x, dtype)
        depth = self.arch.depth
        params = [self.variables["params"][f"blocks_{i}"] for i in range(depth)]
        out = sorted(set(self.out_indices))
        slots = jnp.array([out.index(i) if i in out else len(out) for i in range(depth)])
        kept = jnp.zeros((len(out) + 1, *x.shape), x.dtype)
        keys = [(signature(p), self._block_adapters(i)) for i, p in enumerate(params)]
        for run in uniform_runs(keys):
            layer = self._block(run.start, dtype, parent=None).apply
            if self.remat:
                layer = jax.checkpoint(layer, prevent_cse=False)

            def step(p: Any, carry: tuple, slot: jax.Array, layer=layer) -> tuple:
                h = layer({"params": p}, carry[0])
                return h, jax.lax.dynamic_update_index_in_dim(carry[1], h, slot, 0)

            x, kept = scan_over_layers(step, params[run], (x, kept), slots[run])
        return x, [kept[out.index(i)] for i in self.out_indices]

    def _block_adapters(self, i: int) -> tuple:
        """Block ``i``'s adapter specs by path inside the block (the scan's second key)."""
        prefix = f"blocks_{i}/"
        return tuple((p[len(prefix) :], s) for p, s in self.adapters if p.startswith(prefix))

    def _tokens(
        self, images: jax.Array, masks: jax.Array | None, gh: int, gw: int, square: bool
    ) -> jax.Array:
        """Patch embedding, mask tokens, CLS, position embedding, registers: the official order."""
        a, pd, dtype = self.arch, self.param_dtype, images.dtype
        batch = images.shape[0]
        x = nn.Conv(
            a.embed_dim,
            (a.patch_size, a.patch_size),
            strides=a.patch_size,
            padding="VALID",
            dtype=dtype,
            param_dtype=pd,
            name="patch_embed",
        )(images)
        x = x.reshape(batch, gh * gw, a.embed_dim)
        trunc = nn.initializers.truncated_normal(0.02)
        mask_token = self.param("mask_token", nn.initializers.zeros, (1, a.embed_dim), pd)
        if masks is not None:
            x = jnp.where(masks[..., None], mask_token.astype(dtype), x)
        cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, a.embed_dim), pd)
        pos = self.param("pos_embed", trunc, (1, 1 + a.pos_grid**2, a.embed_dim), pd)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (batch, 1, a.embed_dim)), x], 1)
        x = x + self._position_embedding(pos, gh, gw, square).astype(dtype)
        if a.num_register_tokens:
            reg = self.param("register_tokens", trunc, (1, a.num_register_tokens, a.embed_dim), pd)
            reg = jnp.broadcast_to(reg.astype(dtype), (batch, *reg.shape[1:]))
            x = jnp.concatenate([x[:, :1], reg, x[:, 1:]], axis=1)
        return x

    def _check_attributes(self) -> None:
        bad = [i for i in self.out_indices if not 0 <= i < self.arch.depth]
        if bad:
            raise ValueError(f"out_indices {bad} outside the {self.arch.depth} blocks")
        known = set(linear_layer_paths(self.arch))
        unknown = sorted(p for p, _ in self.adapters if p not in known)
        if unknown:
            raise ValueError(f"adapter layout names layers the backbone does not have: {unknown}")

    def _position_embedding(self, pos: jax.Array, gh: int, gw: int, square: bool) -> jax.Array:
        """The official `interpolate_pos_encoding`, including its early return."""
        n = self.arch.pos_grid
        if gh * gw == n * n and square:
            return pos
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:].reshape(1, n, n, -1)
        if self.interpolate_offset:
            scale = ((gh + self.interpolate_offset) / n, (gw + self.interpolate_offset) / n)
            grid = torch_interpolate(
                patch_pos, (1, 2), scale_factor=scale, antialias=self.interpolate_antialias
            )
        else:
            grid = torch_interpolate(
                patch_pos, (1, 2), size=(gh, gw), antialias=self.interpolate_antialias
            )
        if grid.shape[1:3] != (gh, gw):
            raise ValueError(f"interpolated grid {grid.shape[1:3]} != patch grid {(gh, gw)}")
        return jnp.concatenate([cls_pos, grid.reshape(1, gh * gw, -1)], axis=1)


# Linear layers of each block, by FFN type: the candidates for adapters.
_LINEAR_NAMES = {
    "mlp": ("attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2"),
    "swiglu": ("attn/qkv", "attn/proj", "mlp/w12", "mlp/w3"),
}


def linear_layer_paths(arch: DinoV2Arch) -> list[str]:
    """Every adaptable linear layer of the backbone, as module paths ``blocks_N/attn/qkv``."""
    return [f"blocks_{i}/{m}" for i in range(arch.depth) for m in _LINEAR_NAMES[arch.ffn]]


def linear_layer_shapes(arch: DinoV2Arch) -> dict[str, tuple[int, int]]:
    """``(in, out)`` of each linear layer of one block by its path in the block (``attn/qkv``),
    for counts that need no parameters (FLOPs)."""
    c, h = arch.embed_dim, arch.mlp_hidden
    up = 2 * h if arch.ffn == "swiglu" else h  # w12 holds both SwiGLU branches
    return dict(zip(_LINEAR_NAMES[arch.ffn], ((c, 3 * c), (c, c), (c, up), (h, c)), strict=True))
