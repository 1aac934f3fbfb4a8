"""Mask2Former head (RECIPE.md §4) in Flax linen, as mmdet/mmseg configure it for semantic
segmentation.

Layout is NHWC throughout; the head returns ``pred_masks`` as (B, Q, h, w) because the loss and
the semantic inference treat each query's mask as one map. Initialisers follow mmdet's
``Mask2FormerHead.init_weights`` (the reference's training starts from them); the parity tests
load ``transformers`` weights instead. Differences from ``transformers`` and from the recipe are
listed in ``docs/DESIGN.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from recyclelora_jax.models.layer_scan import scan_over_layers
from recyclelora_jax.models.msdeform import MultiScaleDeformableAttention, reference_points
from recyclelora_jax.models.resize import resize_bilinear, torch_interpolate

LN_EPS = 1e-5
GN_GROUPS, GN_EPS = 32, 1e-5
PYRAMID_SCALES = (4.0, 2.0, 1.0, 0.5)  # ViT stride 16 -> strides 4, 8, 16, 32
NUM_LEVELS = 3  # transformer levels: the three coarsest maps

# mmdet's init (``Mask2FormerHead.init_weights``): torch's xavier_normal_ is untruncated; on the
# decoder's fused ``in_proj_weight`` (3C, C) it gives q/k/v std sqrt(2 / 4C), not sqrt(2 / 2C).
_xavier_uniform = nn.initializers.xavier_uniform()
_xavier_normal = nn.initializers.variance_scaling(1.0, "fan_avg", "normal")  # untruncated
_in_proj_normal = nn.initializers.variance_scaling(0.5, "fan_in", "normal")  # untruncated
_caffe2_xavier = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
_torch_linear = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_linear_bias(fan_in: int):
    """PyTorch's default Linear bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound
    )


def build_pyramid(
    features: Sequence[jax.Array], scales: Sequence[float] = PYRAMID_SCALES
) -> list[jax.Array]:
    """Bilinear ``F.interpolate(scale_factor=s, align_corners=False)`` of each ViT map."""
    if len(features) != len(scales):
        raise ValueError(f"{len(features)} backbone features for {len(scales)} pyramid scales")
    return [
        torch_interpolate(f, (1, 2), scale_factor=(s, s), mode="bilinear")
        for f, s in zip(features, scales, strict=True)
    ]


def sine_position_embedding(height: int, width: int, num_feats: int) -> jax.Array:
    """DETR's normalised sine embedding (temperature 1e4, scale 2*pi) as (h*w, 2*num_feats).

    Channels are (y features, x features), each interleaving sin/cos of the same frequency.
    """
    eps, scale = 1e-6, 2.0 * math.pi
    ys = jnp.arange(1, height + 1, dtype=jnp.float32) / (height + eps) * scale
    xs = jnp.arange(1, width + 1, dtype=jnp.float32) / (width + eps) * scale
    dim_t = 10000.0 ** (2 * (jnp.arange(num_feats) // 2).astype(jnp.float32) / num_feats)

    def encode(v: jax.Array) -> jax.Array:
        p = v[:, None] / dim_t
        return jnp.stack([jnp.sin(p[:, 0::2]), jnp.cos(p[:, 1::2])], -1).reshape(len(v), -1)

    ey, ex = encode(ys), encode(xs)
    grid = jnp.concatenate(
        [
            jnp.broadcast_to(ey[:, None], (height, width, num_feats)),
            jnp.broadcast_to(ex[None], (height, width, num_feats)),
        ],
        -1,
    )
    return grid.reshape(height * width, 2 * num_feats)


def _group_norm(name: str, dtype: Any) -> nn.GroupNorm:
    """GroupNorm whose statistics are float32 whatever ``dtype`` (flax promotes them)."""
    return nn.GroupNorm(GN_GROUPS, epsilon=GN_EPS, use_fast_variance=False, dtype=dtype, name=name)


def _layer_norm(name: str, dtype: Any) -> nn.LayerNorm:
    return nn.LayerNorm(LN_EPS, use_fast_variance=False, dtype=dtype, name=name)


class FeedForward(nn.Module):
    """Linear-ReLU-Linear with a residual and a post LayerNorm."""

    hidden: int
    kernel_init: nn.initializers.Initializer
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(
            self.hidden,
            kernel_init=self.kernel_init,
            bias_init=_torch_linear_bias(x.shape[-1]),  # mmcv's FFN keeps torch's bias init
            dtype=self.dtype,
            name="fc1",
        )(x)
        h = nn.Dense(
            x.shape[-1],
            kernel_init=self.kernel_init,
            bias_init=_torch_linear_bias(self.hidden),
            dtype=self.dtype,
            name="fc2",
        )(nn.relu(h))
        return _layer_norm("final_norm", self.dtype)(x + h)


class EncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then the FFN (both post-norm)."""

    num_heads: int
    num_points: int
    ffn_dim: int
    remat: bool
    dtype: Any = None
    sampling: str = "auto"

    @nn.compact
    def __call__(self, x, pos, refs, shapes):
        attn = MultiScaleDeformableAttention(
            self.num_heads,
            len(shapes),
            self.num_points,
            self.remat,
            self.dtype,
            self.sampling,
            name="self_attn",
        )
        x = _layer_norm("self_attn_norm", self.dtype)(x + attn(x + pos, refs, x, shapes))
        return FeedForward(self.ffn_dim, _xavier_normal, self.dtype, name="ffn")(x)


class PixelDecoder(nn.Module):
    """mmdet's ``MSDeformAttnPixelDecoder``: deformable encoder on the 3 coarsest maps + FPN.

    Input: maps ordered fine to coarse (strides 4, 8, 16, 32). Returns the stride-4 mask features
    and the encoder outputs ordered coarse to fine (strides 32, 16, 8), all NHWC.
    """

    dim: int = 256
    num_heads: int = 8
    num_layers: int = 6
    num_points: int = 4
    ffn_dim: int = 1024
    remat: bool = False
    dtype: Any = None
    sampling: str = "auto"
    remat_layers: bool = False
    scan_layers: bool = False

    @nn.compact
    def __call__(self, features: Sequence[jax.Array]) -> tuple[jax.Array, list[jax.Array]]:
        if len(features) <= NUM_LEVELS:
            raise ValueError(f"pixel decoder needs > {NUM_LEVELS} maps, got {len(features)}")
        b = features[0].shape[0]
        coarse = list(features[::-1][:NUM_LEVELS])
        shapes = tuple((int(f.shape[1]), int(f.shape[2])) for f in coarse)
        dtype = self.dtype
        conv = lambda *a, **k: nn.Conv(*a, dtype=dtype, **k)
        level_embed = self.param("level_embed", nn.initializers.normal(1.0), (NUM_LEVELS, self.dim))
        tokens, pos = [], []
        for i, f in enumerate(coarse):
            y = conv(self.dim, (1, 1), kernel_init=_xavier_uniform, name=f"input_proj_{i}")(f)
            tokens.append(_group_norm(f"input_proj_norm_{i}", dtype)(y).reshape(b, -1, self.dim))
            pos.append(sine_position_embedding(*shapes[i], self.dim // 2) + level_embed[i])
        x = jnp.concatenate(tokens, 1)
        pos = jnp.concatenate(pos, 0)[None].astype(x.dtype)
        refs = reference_points(shapes)[None]
        x = self._encoder(x, pos, refs, shapes)
        splits = [h * w for h, w in shapes]
        starts = [sum(splits[:i]) for i in range(len(splits))]
        outs = [
            x[:, s : s + n].reshape(b, h, w, self.dim)
            for s, n, (h, w) in zip(starts, splits, shapes, strict=True)
        ]
        for i, f in enumerate(features[: len(features) - NUM_LEVELS][::-1]):
            lat = conv(
                self.dim, (1, 1), use_bias=False, kernel_init=_caffe2_xavier, name=f"lateral_{i}"
            )(f)
            lat = _group_norm(f"lateral_norm_{i}", dtype)(lat)
            y = lat + resize_bilinear(outs[-1], lat.shape[1:3])
            y = conv(
                self.dim,
                (3, 3),
                padding=1,
                use_bias=False,
                kernel_init=_caffe2_xavier,
                name=f"output_conv_{i}",
            )(y)
            outs.append(nn.relu(_group_norm(f"output_norm_{i}", dtype)(y)))
        mask_features = conv(self.dim, (1, 1), kernel_init=_caffe2_xavier, name="mask_feature")(
            outs[-1]
        )
        return mask_features, outs[:NUM_LEVELS]

    def _encoder(self, x, pos, refs, shapes):
        """The encoder layers ``encoder_i``: an unrolled loop, or with ``scan_layers`` one scan
        over their per-layer parameters (`layer_scan`; initialisation declares them unrolled)."""
        args = (self.num_heads, self.num_points, self.ffn_dim, self.remat, self.dtype)
        if not self.scan_layers or self.is_initializing():
            cls = nn.remat(EncoderLayer, static_argnums=(4,)) if self.remat_layers else EncoderLayer
            for i in range(self.num_layers):
                x = cls(*args, self.sampling, name=f"encoder_{i}")(x, pos, refs, shapes)
            return x
        apply = EncoderLayer(*args, self.sampling, parent=None).apply
        layer = lambda p, h: apply({"params": p}, h, pos, refs, shapes)
        if self.remat_layers:
            layer = jax.checkpoint(layer, prevent_cse=False)
        params = [self.variables["params"][f"encoder_{i}"] for i in range(self.num_layers)]
        return scan_over_layers(lambda p, h, _: layer(p, h), params, x)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections; ``keep`` (B, T, S) masks keys."""

    num_heads: int
    dtype: Any = None

    @nn.compact
    def __call__(self, q, k, v, keep=None):
        c = q.shape[-1]
        dense = lambda name, init: nn.Dense(c, kernel_init=init, dtype=self.dtype, name=name)
        split = lambda t, name: dense(name, _in_proj_normal)(t).reshape(
            *t.shape[:2], self.num_heads, c // self.num_heads
        )
        out = jax.nn.dot_product_attention(
            split(q, "q_proj"),
            split(k, "k_proj"),
            split(v, "v_proj"),
            mask=None if keep is None else keep[:, None],
        )
        return dense("out_proj", _xavier_normal)(out.reshape(*q.shape[:2], c))


class DecoderLayer(nn.Module):
    """Masked cross-attention -> self-attention -> FFN, each post-norm (Mask2Former order)."""

    num_heads: int
    ffn_dim: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x, query_pos, memory, memory_pos, keep):
        dtype = self.dtype
        h = Attention(self.num_heads, dtype, name="cross_attn")(
            x + query_pos, memory + memory_pos, memory, keep
        )
        x = _layer_norm("cross_attn_norm", dtype)(x + h)
        q = x + query_pos
        h = Attention(self.num_heads, dtype, name="self_attn")(q, q, x)
        x = _layer_norm("self_attn_norm", dtype)(x + h)
        return FeedForward(self.ffn_dim, _xavier_normal, dtype, name="ffn")(x)


class MaskEmbed(nn.Module):
    """The 3-layer ReLU MLP that turns a query into its mask embedding."""

    dim: int
    num_layers: int = 3
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            fan_in = x.shape[-1]
            x = nn.Dense(
                self.dim,
                kernel_init=_torch_linear,
                bias_init=_torch_linear_bias(fan_in),
                dtype=self.dtype,
                name=f"layers_{i}",
            )(x)
            if i < self.num_layers - 1:
                x = nn.relu(x)
        return x


class TransformerDecoder(nn.Module):
    """Learned queries refined by masked attention, round-robin over the levels.

    Returns class logits (L+1, B, Q, K+1) and mask logits (L+1, B, Q, H4, W4): the prediction
    of the initial queries and of each layer.
    """

    num_classes: int
    dim: int = 256
    num_heads: int = 8
    num_layers: int = 9
    ffn_dim: int = 2048
    num_queries: int = 100
    dtype: Any = None
    remat_layers: bool = False
    scan_layers: bool = False  # full rounds over the levels as one scan (`_scanned_rounds`)

    @nn.compact
    def __call__(
        self, levels: Sequence[jax.Array], mask_features: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        b, dtype = mask_features.shape[0], self.dtype or mask_features.dtype
        if any(f.shape[-1] != self.dim for f in (*levels, mask_features)):
            raise ValueError(f"decoder inputs must have {self.dim} channels")
        normal = nn.initializers.normal(1.0)
        level_embed = self.param("level_embed", normal, (len(levels), self.dim))
        shapes = [f.shape[1:3] for f in levels]
        memory = [
            f.reshape(b, -1, self.dim) + level_embed[i].astype(dtype) for i, f in enumerate(levels)
        ]
        memory_pos = [
            sine_position_embedding(h, w, self.dim // 2)[None].astype(dtype) for h, w in shapes
        ]
        x = jnp.broadcast_to(
            self.param("query_feat", normal, (self.num_queries, self.dim)).astype(dtype),
            (b, self.num_queries, self.dim),
        )
        query_pos = self.param("query_embed", normal, (self.num_queries, self.dim))[None]
        query_pos = query_pos.astype(dtype)
        norm = _layer_norm("decoder_norm", dtype)
        class_embed = nn.Dense(
            self.num_classes + 1,
            kernel_init=_torch_linear,
            bias_init=_torch_linear_bias(self.dim),
            dtype=dtype,
            name="class_embed",
        )
        mask_embed = MaskEmbed(self.dim, dtype=dtype, name="mask_embed")

        heads = (norm, mask_embed, class_embed)
        logits, masks, keep = _predict(heads, mask_features, x, shapes[0])
        all_logits, all_masks = [logits[None]], [masks[None]]
        n = len(levels)
        rounds = self.num_layers // n if self.scan_layers and not self.is_initializing() else 0
        if rounds:
            x, keep, (logits, masks) = self._scanned_rounds(
                rounds, heads, x, keep, query_pos, memory, memory_pos, mask_features, shapes
            )
            all_logits.append(logits)
            all_masks.append(masks)
        layer = nn.remat(DecoderLayer) if self.remat_layers else DecoderLayer
        for i in range(rounds * n, self.num_layers):
            lvl = i % n
            x = layer(self.num_heads, self.ffn_dim, dtype, name=f"layers_{i}")(
                x, query_pos, memory[lvl], memory_pos[lvl], keep
            )
            logits, masks, keep = _predict(heads, mask_features, x, shapes[(i + 1) % n])
            all_logits.append(logits[None])
            all_masks.append(masks[None])
        return jnp.concatenate(all_logits), jnp.concatenate(all_masks)

    def _scanned_rounds(
        self, rounds, heads, x, keep, query_pos, memory, memory_pos, mask_features, shapes
    ):
        """The first ``rounds`` full rounds over the levels (layer ``i`` reads level ``i % L``)
        as one scan whose body is one round: its L layers see L different token counts, but
        every round sees the same ones. Parameters stay ``layers_i`` (`layer_scan`); the
        prediction heads are applied with their own parameters inside the body.

        The round is recomputed in the backward (``jax.checkpoint``; with ``remat_layers``
        each layer inside it too): a scan keeps its body's residuals (attention
        probabilities, masks, projections) stacked over the rounds, which took twice the
        unrolled layers' temporaries (6 layers, ``docs/BENCHMARKS.md``); recomputed, only the
        carry is kept per round, below the unrolled layers' memory (without ``remat_layers``;
        with it the scan still takes more, cause not found), for one more decoder forward.
        Returns the carry after the rounds and the rounds' predictions (rounds * L, ...)."""
        n, variables = len(memory), self.variables["params"]
        layer_apply = DecoderLayer(self.num_heads, self.ffn_dim, x.dtype, parent=None).apply
        if self.remat_layers:  # as ``nn.remat(DecoderLayer)``: each layer, not the predictions
            layer_apply = jax.checkpoint(layer_apply, prevent_cse=False)
        heads = tuple(
            (lambda h, m=m: m.clone(parent=None).apply({"params": variables[m.name]}, h))
            for m in heads
        )

        def round_step(p, carry, _):
            x, keep = carry
            outs = []
            for j in range(n):
                x = layer_apply({"params": p[j]}, x, query_pos, memory[j], memory_pos[j], keep)
                *out, keep = _predict(heads, mask_features, x, shapes[(j + 1) % n])
                outs.append(out)
            return (x, keep), jax.tree.map(lambda *a: jnp.stack(a), *outs)

        round_step = jax.checkpoint(round_step, prevent_cse=False)
        params = [[variables[f"layers_{r * n + j}"] for j in range(n)] for r in range(rounds)]
        (x, keep), ys = scan_over_layers(round_step, params, (x, keep), with_outputs=True)
        return x, keep, jax.tree.map(lambda y: y.reshape(-1, *y.shape[2:]), ys)


def _predict(heads, mask_features, x, size):
    """Class logits, mask logits and the next layer's attention mask (at ``size``) of queries
    ``x``, by the decoder's ``(norm, mask_embed, class_embed)``."""
    norm, mask_embed, class_embed = heads
    h = norm(x)
    masks = jnp.einsum("bqc,bhwc->bqhw", mask_embed(h), mask_features)
    return class_embed(h), masks, attention_keep_mask(masks, size)


def attention_keep_mask(mask_logits: jax.Array, size: Sequence[int]) -> jax.Array:
    """Where each query may attend at the next level: (B, Q, h*w) bool.

    The previous mask logits are resized to the level, and positions with ``sigmoid < 0.5`` are
    masked (a sigmoid of exactly 0.5 stays visible); a query masked everywhere sees everything.
    """
    small = torch_interpolate(mask_logits, (2, 3), size=size, mode="bilinear")
    keep = jax.nn.sigmoid(jax.lax.stop_gradient(small).astype(jnp.float32)) >= 0.5
    keep = keep.reshape(*keep.shape[:2], -1)
    return keep | ~keep.any(-1, keepdims=True)


def semantic_scores(
    class_logits: jax.Array, mask_logits: jax.Array, size: tuple[int, int]
) -> jax.Array:
    """mmseg's ``Mask2FormerHead.predict``: mask logits resized to ``size`` *before* the sigmoid,
    then ``softmax(class)[..., :-1]`` weighted sum over queries -> (B, H, W, K)."""
    masks = torch_interpolate(mask_logits, (2, 3), size=size, mode="bilinear")
    probs = jax.nn.softmax(class_logits.astype(jnp.float32), -1)[..., :-1]
    return jnp.einsum("bqk,bqhw->bhwk", probs, jax.nn.sigmoid(masks.astype(jnp.float32)))


class Mask2FormerHead(nn.Module):
    """Feature pyramid -> pixel decoder -> transformer decoder.

    ``__call__(features)`` takes the backbone's same-resolution ViT maps and returns
    ``pred_logits`` (B, Q, K+1) and ``pred_masks`` (B, Q, H/4, W/4) of the last layer plus
    ``aux_logits`` (L, B, Q, K+1) and ``aux_masks`` (L, B, Q, H/4, W/4) of the initial queries
    and the first L-1 layers (deep supervision, all L+1 sets are supervised).
    """

    num_classes: int = 19
    dim: int = 256
    num_queries: int = 100
    num_heads: int = 8
    encoder_layers: int = 6
    encoder_ffn_dim: int = 1024
    num_points: int = 4
    decoder_layers: int = 9
    decoder_ffn_dim: int = 2048
    pyramid_scales: tuple[float, ...] = PYRAMID_SCALES
    remat: bool = False
    dtype: Any = None  # compute dtype; None follows the features (bfloat16 from a bf16 backbone)
    sampling: str = "auto"  # deformable attention's gather / matmul (`msdeform`); auto by backend
    # Recompute each encoder and decoder layer in the backward (keeps only layer inputs).
    remat_layers: bool = False
    # The encoder layers as one scan, compiled once (`PixelDecoder._encoder`), and the decoder
    # layers as one scan over rounds of one layer per level (`TransformerDecoder._scanned_rounds`).
    scan_layers: bool = False

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], train: bool = False) -> dict[str, jax.Array]:
        del train  # no dropout or batch statistics in this head
        dtype = self.dtype or features[0].dtype
        pyramid = build_pyramid([f.astype(dtype) for f in features], self.pyramid_scales)
        mask_features, levels = PixelDecoder(
            self.dim,
            self.num_heads,
            self.encoder_layers,
            self.num_points,
            self.encoder_ffn_dim,
            self.remat,
            dtype,
            self.sampling,
            self.remat_layers,
            self.scan_layers,
            name="pixel_decoder",
        )(pyramid)
        logits, masks = TransformerDecoder(
            self.num_classes,
            self.dim,
            self.num_heads,
            self.decoder_layers,
            self.decoder_ffn_dim,
            self.num_queries,
            dtype,
            self.remat_layers,
            self.scan_layers,
            name="transformer_decoder",
        )(levels, mask_features)
        return {
            "pred_logits": logits[-1],
            "pred_masks": masks[-1],
            "aux_logits": logits[:-1],
            "aux_masks": masks[:-1],
        }

    def scores(self, outputs: dict[str, jax.Array], size: tuple[int, int]) -> jax.Array:
        """Per-pixel class scores (B, H, W, K) at ``size`` from the last prediction set."""
        return semantic_scores(outputs["pred_logits"], outputs["pred_masks"], size)
