"""`python -m recyclelora_jax.data.prepare <dataset> --manual_dir DIR --data_dir DIR`.

Converts a downloaded dataset into its TFDS ArrayRecord form. The output folder appears only when
complete (TFDS renames a temporary folder at the end); converted chunks are cached, so a rerun after
an interruption continues where it stopped; a finished dataset is not rebuilt. Label values
outside the dataset's table become ignore (255), as in the reference's conversion, and are
summarised at the end (per file in the dataset's `metadata.json`); `--strict_labels` stops at
the first file holding one instead.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import tensorflow_datasets as tfds

import recyclelora_jax.data  # noqa: F401  (registers the dg_* builders)
from recyclelora_jax.data.builders import unknown_labels

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
    strict_labels: bool = False,
) -> tfds.core.DatasetBuilder:
    """Builds `dataset` (e.g. `dg_cityscapes`, `dg_acdc/fog`) from `manual_dir` into `data_dir`.
    `skip_invalid`: skip (and count) bad files instead of failing; `strict_labels`: a label
    value outside the table makes its file bad (else it becomes ignore and is counted)."""
    if dataset.split("/")[0] not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    builder = tfds.builder(
        dataset,
        data_dir=os.fspath(data_dir),
        num_workers=num_workers or os.cpu_count() or 1,
        skip_invalid=skip_invalid,
        strict_labels=strict_labels,
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
    parser.add_argument(
        "--strict_labels",
        action="store_true",
        help="a label value outside the dataset's table makes its file bad (default: it is "
        "mapped to ignore and counted, as the reference's conversion maps it)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    builder = prepare(
        args.dataset,
        args.manual_dir,
        args.data_dir,
        num_workers=args.num_workers,
        skip_invalid=args.skip_invalid,
        strict_labels=args.strict_labels,
    )
    unknown = unknown_labels(builder)
    for name, split in builder.info.splits.items():
        print(
            f"{builder.info.full_name} {name}: {split.num_examples} examples in {builder.data_dir}"
        )
        if name in unknown and unknown[name].files:
            print(f"  {unknown[name].summary()}")


if __name__ == "__main__":
    main()
