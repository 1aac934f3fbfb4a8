"""`python -m recyclelora_jax.data.prepare <dataset> --manual_dir DIR --data_dir DIR`.

Converts a downloaded dataset into its TFDS ArrayRecord form. The output folder appears only when
complete (TFDS renames a temporary folder at the end); converted chunks are cached, so a rerun after
an interruption continues where it stopped; a finished dataset is not rebuilt.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import tensorflow_datasets as tfds

import recyclelora_jax.data  # noqa: F401  (registers the dg_* builders)

DATASETS = (
    "dg_gtav",
    "dg_synthia",
    "dg_urbansyn",
    "dg_cityscapes",
    "dg_bdd100k",
    "dg_mapillary",
    "dg_acdc",
)


def prepare(
    dataset: str,
    manual_dir: str | Path,
    data_dir: str | Path,
    *,
    num_workers: int | None = None,
    skip_invalid: bool = False,
) -> tfds.core.DatasetBuilder:
    """Builds `dataset` (e.g. `dg_cityscapes`, `dg_acdc/fog`) from `manual_dir` into `data_dir`."""
    if dataset.split("/")[0] not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    builder = tfds.builder(
        dataset,
        data_dir=os.fspath(data_dir),
        num_workers=num_workers or os.cpu_count() or 1,
        skip_invalid=skip_invalid,
    )
    config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
    builder.download_and_prepare(download_config=config)
    return builder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", help=f"one of {', '.join(DATASETS)} (optionally /config)")
    parser.add_argument("--manual_dir", required=True, help="the extracted official download")
    parser.add_argument("--data_dir", required=True, help="TFDS data directory to write")
    parser.add_argument("--num_workers", type=int, default=None, help="default: all cores")
    parser.add_argument(
        "--skip_invalid", action="store_true", help="skip (and count) bad files instead of failing"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    builder = prepare(
        args.dataset,
        args.manual_dir,
        args.data_dir,
        num_workers=args.num_workers,
        skip_invalid=args.skip_invalid,
    )
    for name, split in builder.info.splits.items():
        print(
            f"{builder.info.full_name} {name}: {split.num_examples} examples in {builder.data_dir}"
        )


if __name__ == "__main__":
    main()
