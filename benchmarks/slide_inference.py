"""Evaluation machinery at real size: sliding windows + resize + argmax + confusion matrix.

The model is a 1x1 convolution (3 -> 19 classes) so the timing is the evaluation overhead that
every real model pays on top of its forward passes. The reference is mmseg 1.x's loop in PyTorch
(`F.pad` accumulation, count map, `F.interpolate`, argmax, `bincount`), same run, same machine.

    python benchmarks/slide_inference.py --height 1024 --width 2048 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from recyclelora_jax.evaluate.inference import logits_to_labels, slide_inference
from recyclelora_jax.evaluate.metrics import confusion_matrix

K = 19


def torch_eval(image, label, weight, crop: int, stride: int) -> torch.Tensor:
    """mmseg `slide_inference` + `postprocess_result` + `IoUMetric` counting, NCHW."""
    batch, _, height, width = image.shape
    h_grids = max(height - crop + stride - 1, 0) // stride + 1
    w_grids = max(width - crop + stride - 1, 0) // stride + 1
    preds = image.new_zeros((batch, K, height, width))
    count = image.new_zeros((batch, 1, height, width))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2 = min(h_idx * stride + crop, height)
            x2 = min(w_idx * stride + crop, width)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            logits = F.conv2d(image[:, :, y1:y2, x1:x2], weight)
            preds += F.pad(logits, (x1, width - x2, y1, height - y2))
            count[:, :, y1:y2, x1:x2] += 1
    logits = F.interpolate(preds / count, size=label.shape[1:], mode="bilinear")
    pred = logits.argmax(1)
    valid = label < K
    return torch.bincount(label[valid] * K + pred[valid], minlength=K * K).reshape(K, K)


def jax_eval(image, label, weight, crop: int, stride: int) -> jax.Array:
    logits = slide_inference(lambda x: x @ weight, image, crop, stride)
    return confusion_matrix(label, logits_to_labels(logits, label.shape[1:]), K)


def best_of(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=1024, help="test-resized image height")
    parser.add_argument("--width", type=int, default=2048, help="test-resized image width")
    parser.add_argument("--label-scale", type=float, default=1.0, help="label size / image size")
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--stride", type=int, default=341)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, args.height, args.width, 3)).astype(np.float32)
    label_size = (round(args.height * args.label_scale), round(args.width * args.label_scale))
    label = rng.integers(0, K + 1, (1, *label_size)).astype(np.int32)
    weight = rng.normal(size=(3, K)).astype(np.float32)

    j_args = (jnp.asarray(image), jnp.asarray(label), jnp.asarray(weight), args.crop, args.stride)
    t_args = (
        torch.from_numpy(image).permute(0, 3, 1, 2).contiguous(),
        torch.from_numpy(label).long(),
        torch.from_numpy(weight.T.copy())[:, :, None, None],
        args.crop,
        args.stride,
    )
    ours, ref = np.asarray(jax_eval(*j_args)), torch_eval(*t_args).numpy()
    moved = np.abs(ours.astype(np.int64) - ref).sum() / 2  # pixels counted in another cell
    jax_s = best_of(lambda: jax_eval(*j_args).block_until_ready(), args.repeats)
    torch_s = best_of(lambda: torch_eval(*t_args), args.repeats)
    print(
        f"image {args.height}x{args.width}, label {label_size[0]}x{label_size[1]}, "
        f"crop {args.crop}, stride {args.stride}, {torch.get_num_threads()} torch threads"
    )
    print(
        f"jax {jax_s * 1e3:.0f} ms | torch {torch_s * 1e3:.0f} ms | torch/jax {torch_s / jax_s:.2f}"
    )
    print(f"confusion matrices: {ref.sum()} pixels, {moved:.0f} counted differently")


if __name__ == "__main__":
    main()
