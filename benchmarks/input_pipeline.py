"""Training input throughput: images/s of 512x512 crops from GTAV-sized (1914x1052) images.

Compares 0 (in-process), 1 and 2 grain workers against the rate one ViT-L training step needs on
one GPU (batch 4 at ~2 steps/s → 8 images/s), and against decoding alone (the floor any pipeline
pays), all in the same run.

    python benchmarks/input_pipeline.py --images 24 --batches 12
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import tensorflow_datasets as tfds

from recyclelora_jax.data import codecs
from recyclelora_jax.data.pipeline import make_train_loader
from recyclelora_jax.data.prepare import prepare
from recyclelora_jax.data.synthetic import write_gtav

NEEDED = 8.0  # images/s for one ViT-L step (batch 4) every 0.5 s on one GPU


def rate(loader, batches: int, batch_size: int) -> float:
    """Images/s over `batches` batches, after one warm-up batch (worker start-up excluded)."""
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - start)


def decode_rate(data_dir: Path, n: int) -> float:
    source = tfds.data_source("dg_gtav", split="train", data_dir=str(data_dir))
    start = time.perf_counter()
    for i in range(n):
        ex = source[i % len(source)]
        codecs.decode_image(ex["image"])
        codecs.decode_label(ex["label"])
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24, help="synthetic GTAV images to write")
    parser.add_argument("--batches", type=int, default=12, help="timed batches per setting")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument(
        "--style", default="photo", help="photo: noisy, textured (decodes like real frames)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = write_gtav(Path(tmp) / "gtav", args.images, (1914, 1052), style=args.style)
        prepare("dg_gtav", root, Path(tmp) / "tfds", num_workers=2)
        floor = decode_rate(Path(tmp) / "tfds", 2 * args.images)
        print(f"decode only (1 core): {floor:.2f} images/s")
        source = [("dg_gtav", "train", str(Path(tmp) / "tfds"))]
        for workers in (0, 1, 2):
            loader = make_train_loader(
                source, batch_size=args.batch_size, seed=0, num_workers=workers,
                shard_index=0, shard_count=1,
            )  # fmt: skip
            r = rate(loader, args.batches, args.batch_size)
            print(
                f"workers={workers}: {r:.2f} images/s = {r / NEEDED:.2f}x the {NEEDED:.0f} images/s"
                f" a ViT-L GPU step needs; {r / floor:.2f}x decode-only"
            )


if __name__ == "__main__":
    main()
