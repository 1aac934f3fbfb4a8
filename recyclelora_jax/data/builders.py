"""TFDS builders of the seven datasets (manual download, ArrayRecord, no TensorFlow needed).

Each example: `image` (the original encoded bytes, or PNG when resized), `label` (PNG of train
ids, 255 = ignore, same size as the image) and `file_name`. `MANUAL_DOWNLOAD_INSTRUCTIONS` of each
builder is the folder layout `--manual_dir` must hold (that of the official download). The label
values found outside the dataset's table (mapped to ignore) are kept, per split and per file,
in the dataset's `metadata.json` (`unknown_labels`).
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
from pathlib import Path
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from recyclelora_jax.data import codecs, labels, layouts
from recyclelora_jax.data.convert import ConvertTask, Pair, UnknownLabels, convert_all, fill_cache

UNKNOWN_LABELS = "unknown_labels"  # metadata key: split -> `UnknownLabels.to_json()`


def unknown_labels(builder: tfds.core.DatasetBuilder) -> dict[str, UnknownLabels]:
    """Split -> the label values outside the table a prepared dataset met (none for a dataset
    prepared before they were recorded: its prepare stopped at any)."""
    metadata = dict((builder.info.metadata or {}).items())  # items() loads TFDS's lazy dict
    return {k: UnknownLabels.from_json(v) for k, v in metadata.get(UNKNOWN_LABELS, {}).items()}


class DgBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared machinery: a dataset subclass only lists its pairs and its label task."""

    VERSION = tfds.core.Version("1.0.0")
    # TFDS derives this from package resources, which fails for editable installs.
    code_path = epath.Path(__file__)
    SPLITS: ClassVar[dict[str, str]] = {}  # TFDS split name → the dataset's own split folder name

    def __init__(
        self,
        *,
        skip_invalid: bool = False,
        strict_labels: bool = False,
        num_workers: int = 1,
        **kwargs,
    ):
        kwargs.setdefault("file_format", "array_record")
        self.skip_invalid = skip_invalid
        self.strict_labels = strict_labels
        self.num_workers = num_workers
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(self.__doc__ or "").strip(),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "label": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "file_name": tfds.features.Text(),
                }
            ),
            metadata=tfds.core.MetadataDict(),
        )

    @property
    def cache_dir(self) -> Path:
        """Where finished conversion chunks wait until the whole dataset is written."""
        name = self.info.full_name.replace("/", "__")
        return Path(self._data_dir_root) / "dg_prepare_cache" / name

    def download_and_prepare(self, *args, download_config=None, **kwargs):
        """Converts every split into the cache, then TFDS writes the dataset from it into a
        temporary `incomplete.*` folder renamed at the end; then the cache is dropped. A prepare
        killed while converting (nearly all of its time) so leaves no `incomplete.*` folder, and
        those of one killed while writing are removed by the next (one prepare per dataset at a
        time)."""
        manual_dir = getattr(download_config, "manual_dir", None)
        if manual_dir and Path(manual_dir).is_dir() and not self.data_path.exists():
            data_path = Path(self.data_path)
            for stale in data_path.parent.glob(f"incomplete.*_{data_path.name}"):
                shutil.rmtree(stale)
            for folder in self.SPLITS.values():
                fill_cache(*self._conversion(Path(manual_dir), folder), **self._convert_options)
        super().download_and_prepare(*args, download_config=download_config, **kwargs)
        shutil.rmtree(self.cache_dir, ignore_errors=True)

    def _split_generators(self, dl_manager):
        root = Path(dl_manager.manual_dir)  # TFDS has checked that it exists and is not empty
        return {
            split: self._generate_examples(root, split, folder)
            for split, folder in self.SPLITS.items()
        }

    def _conversion(self, root: Path, split: str) -> tuple[list[Pair], ConvertTask, Path]:
        task = dataclasses.replace(self.task(root, split), strict_labels=self.strict_labels)
        return self.pairs(root, split), task, self.cache_dir / split

    @property
    def _convert_options(self) -> dict:
        return {"num_workers": self.num_workers, "skip_invalid": self.skip_invalid}

    def _generate_examples(self, root: Path, split: str, folder: str):
        """The examples of ``folder``; once all are out, its `UnknownLabels` go into the
        metadata that TFDS writes with the dataset."""
        pairs, task, cache = self._conversion(root, folder)
        report = UnknownLabels(task.table.name)
        for example in convert_all(pairs, task, cache, report=report, **self._convert_options):
            yield example["file_name"], example
        self.info.metadata.setdefault(UNKNOWN_LABELS, {})[split] = report.to_json()

    def pair_files(
        self,
        image_dir: Path,
        label_dir: Path,
        image_suffix: str,
        label_suffix: str,
        prefixes: tuple[str, str] = ("", ""),
    ):
        return layouts.pair_files(
            image_dir,
            label_dir,
            image_suffix,
            label_suffix,
            skip_invalid=self.skip_invalid,
            prefixes=prefixes,
        )

    def pairs(self, root: Path, split: str) -> list[Pair]:
        raise NotImplementedError

    def task(self, root: Path, split: str) -> ConvertTask:
        raise NotImplementedError


class DgGtav(DgBuilder):
    """GTAV (Richter et al. 2016): game frames, labels are Cityscapes label ids (RECIPE.md §6)."""

    SPLITS: ClassVar[dict[str, str]] = {"train": "train"}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "images/*.png and labels/*.png (palette PNGs of label ids)"

    def pairs(self, root, split):
        return self.pair_files(root / "images", root / "labels", ".png", ".png")

    def task(self, root, split):
        return ConvertTask(labels.GTAV)


class DgSynthia(DgBuilder):
    """SYNTHIA RAND-CITYSCAPES: class ids in the first channel of 16-bit colour label PNGs."""

    SPLITS: ClassVar[dict[str, str]] = {"train": "train"}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "RGB/*.png and GT/LABELS/*.png"

    def pairs(self, root, split):
        return self.pair_files(root / "RGB", root / "GT" / "LABELS", ".png", ".png")

    def task(self, root, split):
        return ConvertTask(
            labels.SYNTHIA, functools.partial(codecs.decode_label_channel, channel=0)
        )


class DgUrbansyn(DgBuilder):
    """UrbanSyn (Gómez et al. 2023): 7,539 photorealistic synthetic frames; `ss/ss_NNNN.png`
    hold train ids 0-18 and 19 for unlabelled, read as they are -- as the official multi-source
    config reads them (mmseg's CityscapesDataset on `rgb/` and `ss/`, no id mapping) -- with 19
    mapped to ignore."""

    SPLITS: ClassVar[dict[str, str]] = {"train": "train"}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "rgb/rgb_NNNN.png and ss/ss_NNNN.png (train-id PNGs)"

    def pairs(self, root, split):
        return self.pair_files(root / "rgb", root / "ss", ".png", ".png", ("rgb_", "ss_"))

    def task(self, root, split):
        return ConvertTask(labels.URBANSYN)


class DgCityscapes(DgBuilder):
    """Cityscapes fine annotations (train 2,975 / val 500)."""

    SPLITS: ClassVar[dict[str, str]] = {"train": "train", "validation": "val"}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and "
        "gtFine/{train,val}/<city>/*_gtFine_labelIds.png"
    )

    def pairs(self, root, split):
        return self.pair_files(
            root / "leftImg8bit" / split,
            root / "gtFine" / split,
            "_leftImg8bit.png",
            "_gtFine_labelIds.png",
        )

    def task(self, root, split):
        return ConvertTask(labels.CITYSCAPES)


class DgBdd100k(DgBuilder):
    """BDD100K 10k semantic segmentation (train 7,000 / val 1,000); masks hold train ids."""

    SPLITS: ClassVar[dict[str, str]] = {"train": "train", "validation": "val"}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "images/10k/{train,val}/*.jpg and labels/sem_seg/masks/{train,val}/*.png"
    )

    def pairs(self, root, split):
        return self.pair_files(
            root / "images" / "10k" / split,
            root / "labels" / "sem_seg" / "masks" / split,
            ".jpg",
            ".png",
        )

    def task(self, root, split):
        return ConvertTask(labels.BDD100K)


class DgMapillary(DgBuilder):
    """Mapillary Vistas v1.2 (train 18,000 / val 2,000), 66 classes mapped by name.

    Config `half` stores the validation split at half resolution (image bicubic, label nearest),
    the evaluation protocol of the reference; `full` keeps every image as downloaded.
    """

    SPLITS: ClassVar[dict[str, str]] = {"train": "training", "validation": "validation"}
    BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
        tfds.core.BuilderConfig(name="full", description="original resolution"),
        tfds.core.BuilderConfig(name="half", description="validation at half resolution"),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "config_v1.2.json (or config.json), {training,validation}/images/*.jpg and "
        "{training,validation}/v1.2/labels/*.png (or {training,validation}/labels/*.png)"
    )

    def pairs(self, root, split):
        split_dir = root / split
        return self.pair_files(
            split_dir / "images", layouts.mapillary_label_dir(split_dir), ".jpg", ".png"
        )

    def task(self, root, split):
        table = labels.mapillary_table(layouts.mapillary_class_names(root))
        return ConvertTask(table, halve=self.builder_config.name == "half" and split != "training")


class DgAcdc(DgBuilder):
    """ACDC (adverse conditions: fog, night, rain, snow), Cityscapes label ids."""

    SPLITS: ClassVar[dict[str, str]] = {"train": "train", "validation": "val"}
    CONDITIONS = ("fog", "night", "rain", "snow")
    BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
        tfds.core.BuilderConfig(name="all", description="all four conditions"),
        *(tfds.core.BuilderConfig(name=c, description=f"{c} only") for c in CONDITIONS),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "rgb_anon/<condition>/{train,val}/<sequence>/*_rgb_anon.png and "
        "gt/<condition>/{train,val}/<sequence>/*_gt_labelIds.png"
    )

    def pairs(self, root, split):
        name = self.builder_config.name
        conditions = self.CONDITIONS if name == "all" else (name,)
        return [
            pair
            for c in conditions
            for pair in self.pair_files(
                root / "rgb_anon" / c / split,
                root / "gt" / c / split,
                "_rgb_anon.png",
                "_gt_labelIds.png",
            )
        ]

    def task(self, root, split):
        return ConvertTask(labels.CITYSCAPES)
