"""The Mask2Former head's initial values against mmdet's `init_weights`, layer by layer.

Written from mmdet 3.x's definitions (`Mask2FormerHead.init_weights`,
`MSDeformAttnPixelDecoder.init_weights`, `MultiScaleDeformableAttention.init_weights` and the
PyTorch defaults of what they leave alone), checked statistically on a width-128 head: every
parameter of the head must match one rule, so a new layer cannot go unchecked.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from recyclelora_jax.heads import build_head

DIM, FFN, IN = 128, 256, 96

# (regex on the parameter path, distribution, fan_in, fan_out); first match wins.
RULES = [
    # Pixel decoder: xavier-uniform input convs (bias 0), caffe2-xavier lateral / output / mask
    # convs (kaiming-uniform a=1, bias 0), N(0, 1) level encoding, GroupNorm ones / zeros.
    (r"pixel_decoder/input_proj_\d/kernel", "xavier_uniform", IN, DIM),
    (r"pixel_decoder/lateral_\d/kernel", "caffe2_xavier", IN, None),
    (r"pixel_decoder/output_conv_\d/kernel", "caffe2_xavier", 9 * DIM, None),
    (r"pixel_decoder/mask_feature/kernel", "caffe2_xavier", DIM, None),
    (r"pixel_decoder/(input_proj_\d|mask_feature)/bias", "zeros", None, None),
    (r"pixel_decoder/level_embed", "normal_1", None, None),
    # Encoder: xavier-normal on every matrix, then the deformable attention's own init: zero
    # offset / attention kernels (the offset bias grid is tested against transformers in
    # test_msdeform), xavier-uniform value / output projections with bias 0.
    (r"encoder_\d/self_attn/(sampling_offsets|attention_weights)/kernel", "zeros", None, None),
    (r"encoder_\d/self_attn/attention_weights/bias", "zeros", None, None),
    (r"encoder_\d/self_attn/sampling_offsets/bias", "grid", None, None),
    (r"encoder_\d/self_attn/(value_proj|output_proj)/kernel", "xavier_uniform", DIM, DIM),
    (r"encoder_\d/self_attn/(value_proj|output_proj)/bias", "zeros", None, None),
    # FFNs (encoder and decoder): xavier-normal matrices, PyTorch-default Linear biases.
    (r"ffn/fc1/kernel", "xavier_normal", DIM, FFN),
    (r"ffn/fc2/kernel", "xavier_normal", FFN, DIM),
    (r"ffn/fc1/bias", "torch_linear", DIM, None),
    (r"ffn/fc2/bias", "torch_linear", FFN, None),
    # Decoder attention: nn.MultiheadAttention's fused (3C, C) in-projection gets xavier-normal
    # as one matrix (fans C and 3C), the output projection as (C, C); their biases are 0.
    (r"layers_\d/(self|cross)_attn/(q|k|v)_proj/kernel", "xavier_normal", DIM, 3 * DIM),
    (r"layers_\d/(self|cross)_attn/out_proj/kernel", "xavier_normal", DIM, DIM),
    (r"layers_\d/(self|cross)_attn/\w+_proj/bias", "zeros", None, None),
    # Head: N(0, 1) query features, query and level embeddings; PyTorch-default Linear init of
    # the class and mask-embedding layers (they sit outside mmdet's transformer decoder).
    (r"transformer_decoder/(query_feat|query_embed|level_embed)", "normal_1", None, None),
    (r"class_embed/kernel", "torch_linear", DIM, None),
    (r"class_embed/bias", "torch_linear", DIM, None),
    (r"mask_embed/layers_\d/(kernel|bias)", "torch_linear", DIM, None),
    (r"norm\w*/scale", "ones", None, None),
    (r"norm\w*/bias", "zeros", None, None),
]


@pytest.fixture(scope="module")
def head_params():
    head = build_head(
        "mask2former", 19, num_queries=100, dim=DIM, encoder_layers=1, decoder_layers=2,
        encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
    )  # fmt: skip
    features = [jnp.zeros((1, 4, 4, IN))] * 4
    params = jax.jit(head.init)(jax.random.key(0), features)["params"]
    return {
        k: np.asarray(v, np.float64) for k, v in traverse_util.flatten_dict(params, sep="/").items()
    }


def _check(kind: str, w: np.ndarray, fan_in, fan_out, path: str) -> None:
    if kind in ("zeros", "ones"):
        np.testing.assert_array_equal(w, 0.0 if kind == "zeros" else 1.0, err_msg=path)
        return
    if kind == "grid":
        assert np.abs(w).max() >= 1.0, path  # nonzero reference-point grid
        return
    if kind == "normal_1":
        assert abs(w.std() - 1.0) < 0.1 and abs(w.mean()) < 0.1, (path, w.std(), w.mean())
        return
    if kind == "xavier_normal":
        std = math.sqrt(2.0 / (fan_in + fan_out))
        assert abs(w.std() / std - 1) < 0.08, (path, w.std(), std)
        assert np.abs(w).max() > 2.6 * std, (path, "uniform or truncated, not normal")
        return
    bound = {
        "xavier_uniform": lambda: math.sqrt(6.0 / (fan_in + fan_out)),
        "caffe2_xavier": lambda: math.sqrt(3.0 / fan_in),
        "torch_linear": lambda: 1.0 / math.sqrt(fan_in),
    }[kind]()
    assert np.abs(w).max() <= bound * (1 + 1e-6), (path, np.abs(w).max(), bound)
    lower = 0.9 if w.size >= 1000 else 0.5
    assert np.abs(w).max() >= lower * bound, (path, np.abs(w).max(), bound)
    if w.size >= 1000:
        assert abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.08, (path, w.std(), bound)


def test_every_head_parameter_follows_mmdet_init(head_params):
    unmatched, wrong = [], []
    for path, value in head_params.items():
        rule = next((r for r in RULES if re.search(r[0], path)), None)
        if rule is None:
            unmatched.append(path)
            continue
        try:
            _check(rule[1], value, rule[2], rule[3], path)
        except AssertionError as err:
            wrong.append(f"{path} ({rule[1]}): {err}")
    assert not unmatched, f"head parameters no init rule covers: {unmatched}"
    assert not wrong, "\n".join(wrong)
