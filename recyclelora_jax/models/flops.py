"""Analytic FLOPs of a training step, counted from the architecture.

The compiler's FLOP count includes padding, recomputation (remat) and elementwise work; this
count is the work the model needs, so their ratio shows the waste. Only matrix products and the
bilinear sampling sums are counted (elementwise ops, norms and softmaxes are a few percent).
The backward pass of a product costs one forward for the input gradient (when something before
it trains) and one more for the weight gradient (when the weight trains): a frozen backbone
with adapters costs about 2x its forward, a trained one 3x.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from recyclelora_jax.models.adapters import AdapterLayout
from recyclelora_jax.models.dinov2 import DinoV2Arch, linear_layer_shapes
from recyclelora_jax.models.mask2former import NUM_LEVELS, PYRAMID_SCALES


@dataclasses.dataclass(frozen=True)
class Flops:
    """Forward and backward FLOPs of one image."""

    forward: float = 0.0
    backward: float = 0.0

    @property
    def train(self) -> float:
        return self.forward + self.backward

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.forward + other.forward, self.backward + other.backward)

    def __mul__(self, n: float) -> Flops:
        return Flops(self.forward * n, self.backward * n)

    __rmul__ = __mul__


def matmul(m: int, k: int, n: int, weight_grad: bool, input_grad: bool = True) -> Flops:
    """(m, k) @ (k, n): 2mkn forward; backward one 2mkn per gradient that is needed."""
    f = 2.0 * m * k * n
    return Flops(f, f * (int(input_grad) + int(weight_grad)))


def backbone_flops(
    arch: DinoV2Arch,
    image_hw: tuple[int, int],
    out_indices: Sequence[int],
    adapters: AdapterLayout = (),
    mode: str = "adapters",
) -> Flops:
    """DINOv2 up to the last block the head reads. ``mode``: "adapters" (frozen kernels,
    trained adapters), "full" (every kernel trains) or "frozen" (no backward at all)."""
    if mode not in ("adapters", "full", "frozen"):
        raise ValueError(f"mode must be adapters, full or frozen, got {mode!r}")
    p, c = arch.patch_size, arch.embed_dim
    patches = (image_hw[0] // p) * (image_hw[1] // p)
    t = 1 + arch.num_register_tokens + patches
    train_kernels = mode == "full"
    specs = dict(adapters)
    total = matmul(patches, p * p * 3, c, train_kernels, input_grad=False)
    shapes = linear_layer_shapes(arch)
    for i in range(max(out_indices) + 1):
        for name, (n_in, n_out) in shapes.items():
            total += matmul(t, n_in, n_out, train_kernels)
            spec = specs.get(f"blocks_{i}/{name}")
            if spec is not None:
                r = spec.total_rank
                total += matmul(t, n_in, r, True) + matmul(t, r, n_out, True)
        total += 2 * matmul(t, c, t, True)  # q k^T and weights @ v, all heads; both sides train
    return Flops(total.forward, 0.0) if mode == "frozen" else total


def _pyramid_sizes(grid: tuple[int, int], scales: Sequence[float]) -> list[tuple[int, int]]:
    return [(math.floor(grid[0] * s), math.floor(grid[1] * s)) for s in scales]


def mask2former_flops(head: Mapping[str, Any], vit_dim: int, grid: tuple[int, int]) -> Flops:
    """Mask2Former (pixel decoder, transformer decoder, every prediction set) for one image
    whose ViT grid is ``grid``; ``head`` holds the config's head hyper-parameters."""
    d, q, k = head.get("dim", 256), head.get("num_queries", 100), head["num_classes"]
    heads, points = head.get("num_heads", 8), head.get("num_points", 4)
    enc_layers, dec_layers = head.get("encoder_layers", 6), head.get("decoder_layers", 9)
    enc_ffn, dec_ffn = head.get("encoder_ffn_dim", 1024), head.get("decoder_ffn_dim", 2048)
    sizes = _pyramid_sizes(grid, head.get("pyramid_scales", PYRAMID_SCALES))
    coarse = [h * w for h, w in sizes[::-1][:NUM_LEVELS]]
    fine = [h * w for h, w in sizes[: len(sizes) - NUM_LEVELS]]
    s = sum(coarse)
    total = sum((matmul(n, vit_dim, d, True) for n in coarse), Flops())
    sampling = 2.0 * s * NUM_LEVELS * points * 4 * d  # 4 corners x head_dim, all heads
    layer = (
        matmul(s, d, heads * NUM_LEVELS * points * 3, True)  # offsets (x, y) and weights
        + matmul(s, d, d, True) * 2  # value and output projections
        + Flops(sampling, 2 * sampling)  # gradients to the values and to the weights
        + matmul(s, d, enc_ffn, True)
        + matmul(s, enc_ffn, d, True)
    )
    total += layer * enc_layers
    for n in fine:  # lateral 1x1, output 3x3, mask features 1x1
        total += matmul(n, vit_dim, d, True) + matmul(n, 9 * d, d, True) + matmul(n, d, d, True)
    stride4 = fine[-1] if fine else coarse[-1]
    predict = matmul(q, d, d, True) * 3 + matmul(q, d, k + 1, True) + matmul(q, d, stride4, True)
    total += predict * (dec_layers + 1)
    for i in range(dec_layers):
        mem = coarse[i % NUM_LEVELS]
        total += (
            matmul(q, d, d, True) * 6  # cross q/out, self q/k/v/out projections
            + matmul(mem, d, d, True) * 2  # cross k/v projections of the memory
            + matmul(q, d, mem, True) * 2
            + matmul(q, d, q, True) * 2
            + matmul(q, d, dec_ffn, True)
            + matmul(q, dec_ffn, d, True)
        )
    return total


def set_loss_flops(head: Mapping[str, Any], loss_points: int, oversample: float) -> Flops:
    """The set loss over every prediction set: per set, bilinear samples (4 corners,
    multiply-add) of every mask at the matching points and three (Q, P) x (P, K) matching costs
    (no gradient: the match is discrete), then the matched masks at the oversampled points (no
    gradient) and at the loss points."""
    q, k = head.get("num_queries", 100), head["num_classes"]
    p, over = loss_points, int(loss_points * oversample)
    one = Flops(8.0 * q * p + 3 * 2.0 * q * p * k + 8.0 * k * over + 8.0 * k * p, 8.0 * k * p)
    return one * (head.get("decoder_layers", 9) + 1)


def linear_head_flops(num_classes: int, vit_dim: int, grid: tuple[int, int], maps: int) -> Flops:
    """The linear probe: a 1x1 conv over the concatenated maps at the ViT grid."""
    return matmul(grid[0] * grid[1], maps * vit_dim, num_classes, True)
