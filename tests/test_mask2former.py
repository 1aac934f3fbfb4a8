"""Mask2Former pixel decoder and transformer decoder against transformers' PyTorch modules.

Random weights, small sizes (32-d, 2 encoder and 3 decoder layers), converted from the torch
state_dict into the project's parameter tree; tolerance 1e-4 on the mask features, and on the
class and mask logits of every prediction set.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.mask2former import modeling_mask2former as hf

from recyclelora_jax.models.mask2former import (
    Mask2FormerHead,
    PixelDecoder,
    TransformerDecoder,
    attention_keep_mask,
    build_pyramid,
    semantic_scores,
    sine_position_embedding,
)

DIM, HEADS, QUERIES, CLASSES, IN_CH = 32, 4, 10, 5, 48
SIZES = ((16, 12), (8, 6), (4, 3), (2, 1))  # strides 4..32 of a 64x48 image


def _config():
    return hf.Mask2FormerConfig(
        feature_size=DIM,
        mask_feature_size=DIM,
        hidden_dim=DIM,
        encoder_layers=2,
        decoder_layers=4,  # transformers counts the initial prediction: 3 layers
        num_attention_heads=HEADS,
        encoder_feedforward_dim=64,
        dim_feedforward=64,
        num_queries=QUERIES,
        num_labels=CLASSES,
        feature_strides=[4, 8, 16, 32],
        common_stride=4,
    )


def _randomize(module: torch.nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(0.0, 0.3)
            if ("norm" in name and name.endswith("weight")) or ".1.weight" in name:
                p.add_(1.0)  # norm scales around 1


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _dense(sd: dict, prefix: str) -> dict:
    return {"kernel": _np(sd[f"{prefix}.weight"]).T, "bias": _np(sd[f"{prefix}.bias"])}


def _norm(sd: dict, prefix: str) -> dict:
    return {"scale": _np(sd[f"{prefix}.weight"]), "bias": _np(sd[f"{prefix}.bias"])}


def _conv(sd: dict, prefix: str) -> dict:
    out = {"kernel": _np(sd[f"{prefix}.weight"]).transpose(2, 3, 1, 0)}
    if f"{prefix}.bias" in sd:
        out["bias"] = _np(sd[f"{prefix}.bias"])
    return out


def _ffn(sd: dict, prefix: str) -> dict:
    return {
        "fc1": _dense(sd, f"{prefix}.fc1"),
        "fc2": _dense(sd, f"{prefix}.fc2"),
        "final_norm": _norm(sd, f"{prefix}.final_layer_norm"),
    }


def convert_pixel_decoder(sd: dict, encoder_layers: int, num_fpn: int) -> dict:
    """transformers ``Mask2FormerPixelDecoder`` state_dict -> ``PixelDecoder`` params."""
    p = {"level_embed": _np(sd["level_embed"]), "mask_feature": _conv(sd, "mask_projection")}
    for i in range(3):
        p[f"input_proj_{i}"] = _conv(sd, f"input_projections.{i}.0")
        p[f"input_proj_norm_{i}"] = _norm(sd, f"input_projections.{i}.1")
    for i in range(encoder_layers):
        pre = f"encoder.layers.{i}"
        attn = ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
        p[f"encoder_{i}"] = {
            "self_attn": {n: _dense(sd, f"{pre}.self_attn.{n}") for n in attn},
            "self_attn_norm": _norm(sd, f"{pre}.self_attn_layer_norm"),
            "ffn": _ffn(sd, pre),
        }
    for i in range(num_fpn):  # ours run coarse to fine, transformers names them fine to coarse
        k = num_fpn - i
        p[f"lateral_{i}"] = _conv(sd, f"adapter_{k}.0")
        p[f"lateral_norm_{i}"] = _norm(sd, f"adapter_{k}.1")
        p[f"output_conv_{i}"] = _conv(sd, f"layer_{k}.0")
        p[f"output_norm_{i}"] = _norm(sd, f"layer_{k}.1")
    return p


def _mha(sd: dict, prefix: str) -> dict:
    """torch ``nn.MultiheadAttention`` (fused in_proj) -> separate q/k/v projections."""
    w, b = _np(sd[f"{prefix}.in_proj_weight"]), _np(sd[f"{prefix}.in_proj_bias"])
    out = {"out_proj": _dense(sd, f"{prefix}.out_proj")}
    for j, n in enumerate(("q_proj", "k_proj", "v_proj")):
        rows = slice(j * DIM, (j + 1) * DIM)
        out[n] = {"kernel": w[rows].T, "bias": b[rows]}
    return out


def convert_transformer_decoder(sd: dict, class_sd: dict, layers: int) -> dict:
    """transformers ``Mask2FormerTransformerModule`` + class predictor -> ``TransformerDecoder``."""
    p = {
        "level_embed": _np(sd["level_embed.weight"]),
        "query_feat": _np(sd["queries_features.weight"]),
        "query_embed": _np(sd["queries_embedder.weight"]),
        "decoder_norm": _norm(sd, "decoder.layernorm"),
        "class_embed": _dense(class_sd, "cls"),
        "mask_embed": {
            f"layers_{i}": _dense(sd, f"decoder.mask_predictor.mask_embedder.{i}.0")
            for i in range(3)
        },
    }
    for i in range(layers):
        pre = f"decoder.layers.{i}"
        p[f"layers_{i}"] = {
            "cross_attn": _mha(sd, f"{pre}.cross_attn"),
            "cross_attn_norm": _norm(sd, f"{pre}.cross_attn_layer_norm"),
            "self_attn": {
                n: _dense(sd, f"{pre}.self_attn.{n}")
                for n in ("q_proj", "k_proj", "v_proj", "out_proj")
            },
            "self_attn_norm": _norm(sd, f"{pre}.self_attn_layer_norm"),
            "ffn": _ffn(sd, pre),
        }
    return p


@pytest.fixture(scope="module")
def reference():
    """Torch pixel decoder + transformer module + class predictor and their outputs."""
    config = _config()
    pixel = hf.Mask2FormerPixelDecoder(config, feature_channels=[IN_CH] * 4).eval()
    transformer = hf.Mask2FormerTransformerModule(DIM, config).eval()
    cls = torch.nn.Linear(DIM, CLASSES + 1)
    for seed, m in enumerate((pixel, transformer, cls)):
        _randomize(m, seed)
    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(2, h, w, IN_CH)).astype(np.float32) for h, w in SIZES]
    with torch.no_grad():
        out = pixel([torch.from_numpy(f).permute(0, 3, 1, 2) for f in feats])
        dec = transformer(out.multi_scale_features, out.mask_features)
        logits = [cls(h.transpose(0, 1)) for h in dec.intermediate_hidden_states]
    return {
        "feats": feats,
        "pixel_params": convert_pixel_decoder(pixel.state_dict(), 2, 1),
        "decoder_params": convert_transformer_decoder(
            transformer.state_dict(), {"cls.weight": cls.weight, "cls.bias": cls.bias}, 3
        ),
        "mask_features": _np(out.mask_features).transpose(0, 2, 3, 1),
        "levels": [_np(f).transpose(0, 2, 3, 1) for f in out.multi_scale_features],
        "logits": np.stack([_np(x) for x in logits]),
        "masks": np.stack([_np(m) for m in dec.masks_queries_logits]),
    }


def test_pixel_decoder_parity(reference):
    decoder = PixelDecoder(DIM, HEADS, num_layers=2, ffn_dim=64)
    mask_features, levels = jax.jit(decoder.apply)(
        {"params": reference["pixel_params"]}, [jnp.asarray(f) for f in reference["feats"]]
    )
    np.testing.assert_allclose(mask_features, reference["mask_features"], atol=1e-4, rtol=1e-4)
    for got, want in zip(levels, reference["levels"], strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_transformer_decoder_parity(reference):
    """Every prediction set (initial queries + 3 layers) matches; fed the reference's inputs."""
    decoder = TransformerDecoder(CLASSES, DIM, HEADS, 3, 64, QUERIES)
    logits, masks = jax.jit(decoder.apply)(
        {"params": reference["decoder_params"]},
        [jnp.asarray(x) for x in reference["levels"]],
        jnp.asarray(reference["mask_features"]),
    )
    assert logits.shape == (4, 2, QUERIES, CLASSES + 1)
    np.testing.assert_allclose(logits, reference["logits"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(masks, reference["masks"], atol=1e-4, rtol=1e-4)


def test_head_end_to_end_parity(reference):
    """The whole head, jitted, equals the torch chain. The decoder now sees the JAX pixel
    decoder's outputs (1e-4 away), so the bound is 1e-4 of each output's largest magnitude."""
    head_params = {
        "pixel_decoder": reference["pixel_params"],
        "transformer_decoder": reference["decoder_params"],
    }
    head = Mask2FormerHead(
        CLASSES,
        DIM,
        QUERIES,
        HEADS,
        2,
        64,
        decoder_layers=3,
        decoder_ffn_dim=64,
        pyramid_scales=(1.0, 1.0, 1.0, 1.0),
    )
    with pytest.raises(ValueError, match="pyramid scales"):
        head.apply({"params": head_params}, [jnp.asarray(f) for f in reference["feats"][:3]])
    # the pyramid is the identity at scale 1, so the reference maps go straight in
    out = jax.jit(lambda p, f: head.apply({"params": p}, f))(
        head_params, [jnp.asarray(f) for f in reference["feats"]]
    )
    for key, want in (
        ("pred_logits", reference["logits"][-1]),
        ("aux_masks", reference["masks"][:-1]),
    ):
        np.testing.assert_allclose(out[key], want, atol=1e-4 * np.abs(want).max())


def test_tpu_layout_and_layer_remat_keep_outputs_and_gradients(reference):
    """matmul sampling + every layer rematerialised: the same parameter tree (the reference's),
    outputs and gradients equal to the default layout to 3e-5 of the largest output / the
    largest gradient entry. That is float32 rounding: against the same head in float64, the
    default layout's own gradient of ``encoder_0``'s sampling-offset kernel is 1.2e-5 of the
    largest entry off, the matmul layout's 1.8e-5 (bilinear sampling's derivative is steep
    where points cross pixel centres; some gradients, such as biases before a norm, are zero
    up to cancellation of terms in the hundreds). A wrong corner or weight is off by O(1)."""
    head_params = {
        "pixel_decoder": reference["pixel_params"],
        "transformer_decoder": reference["decoder_params"],
    }
    feats = [jnp.asarray(f) for f in reference["feats"]]
    kw = dict(decoder_layers=3, decoder_ffn_dim=64, pyramid_scales=(1.0,) * 4)

    def run(**layout):
        head = Mask2FormerHead(CLASSES, DIM, QUERIES, HEADS, 2, 64, **kw, **layout)
        fn = lambda p, f: head.apply({"params": p}, f)
        out, vjp = jax.vjp(fn, head_params, feats)
        return out, vjp(jax.tree.map(jnp.sin, out))

    want, got = run(), run(sampling="matmul", remat=True, remat_layers=True)
    for w, g in zip(want, got, strict=True):
        scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(w))
        for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(g), strict=True):
            np.testing.assert_allclose(b, a, rtol=0, atol=3e-5 * scale)


def test_pyramid_matches_torch_interpolate():
    x = np.random.default_rng(0).normal(size=(1, 6, 5, 3)).astype(np.float32)
    got = build_pyramid([jnp.asarray(x)] * 4)
    for g, s in zip(got, (4.0, 2.0, 1.0, 0.5), strict=True):
        want = torch.nn.functional.interpolate(
            torch.from_numpy(x).permute(0, 3, 1, 2),
            scale_factor=s,
            mode="bilinear",
            align_corners=False,
        ).permute(0, 2, 3, 1)
        np.testing.assert_allclose(g, want.numpy(), atol=1e-5)


def test_sine_embedding_matches_transformers():
    want = hf.Mask2FormerSinePositionEmbedding(num_position_features=16, normalize=True)(
        torch.Size((1, 3, 5, 7)), "cpu", torch.float32
    )
    got = sine_position_embedding(5, 7, 16)
    np.testing.assert_allclose(got, want[0].permute(1, 2, 0).reshape(35, 32), atol=1e-5)


def test_attention_mask_rule_hand_computed():
    """sigmoid < 0.5 is masked (0.0 logit stays visible); an all-masked query sees everything."""
    logits = jnp.asarray([[[[0.0, -1.0], [2.0, -3.0]], [[-1.0, -1.0], [-2.0, -5.0]]]])
    keep = attention_keep_mask(logits, (2, 2))
    np.testing.assert_array_equal(keep[0], [[True, False, True, False], [True] * 4])


def test_semantic_scores_hand_computed():
    """mmseg order: mask logits are upsampled, then sigmoid, then weighted by class softmax."""
    cls = jnp.asarray([[[0.0, 0.0, np.log(2.0)], [np.log(3.0), 0.0, 0.0]]])  # K=2 + no-object
    masks = jnp.asarray([[[[0.0, 2.0]], [[-1.0, 1.0]]]])  # 2 queries, 1x2 map
    got = semantic_scores(cls, masks, (1, 4))
    up = torch.nn.functional.interpolate(
        torch.tensor(np.asarray(masks)), size=(1, 4), mode="bilinear", align_corners=False
    ).sigmoid()[0, :, 0]  # (Q, 4)
    probs = np.array([[0.25, 0.25], [0.6, 0.2]])
    want = np.einsum("qk,qw->wk", probs, up.numpy())
    np.testing.assert_allclose(got[0, 0], want, atol=1e-6)
