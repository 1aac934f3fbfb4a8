"""Does the demo's stand-in foundation model transfer across styles? A frozen-backbone probe.

The demo's tiny ViT (random, or pretrained by `pretrain.pretrain_contrastive` on native-scale
crops of unlabelled train images of every style; by default with the demo's settings: each
image standardised per channel at the input, LayerScale 1 at the pretraining's start, 128-px
crops of batch 6, the loss on every block the head reads) is frozen; DINOv2's linear head
(LayerNorm + 1x1 conv on the concatenated block outputs) is trained on the source style only,
with the training augmentation of `train.py` (random scale, crop, flip, photometric distortion),
then evaluated on held-out scenes of every style as two 128x128 windows per 256x128 image. The
per-pixel colour baseline that the probe should beat on the targets is
`tests/test_data_synthetic.py`'s. ``--seeds 0,1,2`` repeats pretraining and probe per seed
and reports each style's mean and sample std.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from recyclelora_jax.classes import IGNORE
from recyclelora_jax.data import synthetic
from recyclelora_jax.data.transforms import normalize, scales_for, train_augment
from recyclelora_jax.models.dinov2 import ARCHS, DinoV2
from recyclelora_jax.models.linear_head import LinearHead
from recyclelora_jax.models.resize import resize_bilinear
from recyclelora_jax.pretrain import native_crops, pretrain_contrastive

SEEDS = {"synthetic": 0, "photo": 1, "dusk": 2}  # write_synthetic's seeds of each dataset


def scenes(style: str, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    pairs = [synthetic.make_example(SEEDS[style], i, style) for i in range(start, start + count)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def windows(x: np.ndarray) -> np.ndarray:
    """(N, 128, 256, ...) -> (2N, 128, 128, ...): the two non-overlapping 128-px windows."""
    return np.concatenate([x[:, :, :128], x[:, :, 128:]])


def probe(backbone: DinoV2, params: dict, data: dict, steps: int, batch: int, seed: int) -> dict:
    """mIoU (%) per style of a linear head trained on the frozen ``params``; ``seed`` draws the
    head's init and its training crops."""
    features = jax.jit(lambda x: backbone.apply({"params": params}, x)["features"])
    images, labels = data["synthetic_train"]
    rng = np.random.default_rng(seed)

    def augmented(n):
        pairs = [
            train_augment(images[i], labels[i], rng, (128, 128), scales_for(128), 512)
            for i in rng.choice(len(images), n)
        ]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    head = LinearHead(19)
    head_params = head.init(jax.random.key(seed), features(augmented(2)[0]))["params"]
    tx = optax.adam(1e-3)
    opt_state = tx.init(head_params)

    @jax.jit
    def step(head_params, opt_state, feats, label):
        def loss_fn(p):
            logits = resize_bilinear(head.apply({"params": p}, feats)["logits"], label.shape[1:3])
            valid = label != IGNORE
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, label, 0))
            return (ce * valid).sum() / valid.sum()

        grads = jax.grad(loss_fn)(head_params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(head_params, updates), opt_state

    for _ in range(steps):
        x, y = augmented(batch)
        head_params, opt_state = step(head_params, opt_state, features(x), y)
    logits_fn = jax.jit(
        lambda x: resize_bilinear(
            head.apply({"params": head_params}, features(x))["logits"], x.shape[1:3]
        )
    )
    scores = {}
    for style in SEEDS:
        x, y = (windows(a) for a in data[f"{style}_val"])
        pred = np.concatenate(
            [np.asarray(logits_fn(normalize(x[i : i + 25]))) for i in range(0, len(x), 25)]
        ).argmax(-1)
        keep = y != IGNORE
        cm = np.bincount(y[keep] * 19 + pred[keep], minlength=361).reshape(19, 19)
        inter = np.diag(cm)
        union = cm.sum(0) + cm.sum(1) - inter
        scores[style] = float(100 * np.mean(inter[union > 0] / union[union > 0]))
    return scores


def run(args: argparse.Namespace, data: dict, seed: int) -> dict:
    """One seed: the pretraining (its init, crops and views) and the probe drawn from ``seed``."""
    out_indices = tuple(int(i) for i in args.out_indices.split(","))
    backbone = DinoV2(
        ARCHS["tiny"],
        out_indices=out_indices,
        input_norm=args.input_norm,
        layerscale_init=args.layerscale_init,
    )
    start, cpu = time.perf_counter(), time.process_time()
    if args.pretrain_steps:
        unlabelled = np.concatenate([data[f"{s}_train"][0] for s in SEEDS])
        batches = native_crops(unlabelled, args.pretrain_crop, args.pretrain_batch, seed)
        params = pretrain_contrastive(
            backbone,
            batches,
            steps=args.pretrain_steps,
            every_block=args.every_block,
            seed=seed,
        )
    else:
        params = backbone.init(jax.random.key(seed), np.zeros((1, 64, 64, 3), np.float32))
        params = params["params"]
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu  # CPU: all threads
    scores = probe(backbone, params, data, args.probe_steps, args.probe_batch, seed)
    return {"pretrain_s": round(wall, 1), "pretrain_cpu_s": round(cpu, 1), "miou": scores}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0", help="comma-separated; each pretrains and probes anew")
    p.add_argument("--pretrain-steps", type=int, default=300, help="0: a random backbone")
    p.add_argument("--pretrain-batch", type=int, default=6)
    p.add_argument("--pretrain-crop", type=int, default=128, help="native-scale crops")
    p.add_argument(
        "--every-block",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the loss on every block the head reads (else the last block's normed tokens)",
    )
    p.add_argument("--probe-steps", type=int, default=300)
    p.add_argument("--probe-batch", type=int, default=8)
    p.add_argument("--out-indices", default="0,1,2,3", help="blocks the head reads")
    # The demo's stand-in (configs/demo.py): per-image standardised inputs, LayerScale 1 at start;
    # the pretraining flags' defaults are its pretraining's too.
    p.add_argument("--input-norm", default="image", choices=("image", "dataset"))
    p.add_argument("--layerscale-init", type=float, default=1.0, help="at pretraining's start")
    args = p.parse_args()
    data = {}
    for style in SEEDS:
        data[f"{style}_train"] = scenes(style, 0, 200)
        data[f"{style}_val"] = scenes(style, 200, 50)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = {}
    for seed in seeds:
        runs[seed] = run(args, data, seed)
        print(json.dumps({"seed": seed, **runs[seed]}), flush=True)
    summary = {}
    for style in SEEDS:
        values = np.array([r["miou"][style] for r in runs.values()])
        std = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        summary[style] = {"mean": round(float(values.mean()), 2), "std": round(std, 2)}
    print(json.dumps({**vars(args), "miou": summary, "load": os.getloadavg()}))
    print(f"{platform.processor() or platform.machine()}, jax {jax.__version__}")


if __name__ == "__main__":
    main()
