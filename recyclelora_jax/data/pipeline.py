"""Training input: TFDS ArrayRecord sources → grain (shuffle, augment, batch), checkpointable.

Several sources are concatenated (multi-source settings), each optionally a random subset drawn
from the seed (GTAV: 12,403 by default, as the reference does per run). A fixed permutation of the
concatenation, identical in every process, is cut into contiguous per-process shards, so shards
are disjoint, cover the data and mix all sources. grain reshuffles each shard every epoch and gives
every record a generator keyed on (seed, global position), so results do not depend on the
number of workers. Workers augment single examples; batches are stacked in the consuming process,
so batch composition is independent of the worker count too, and `iter(loader).get_state()`
(JSON bytes) taken between batches restores the exact stream.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import grain.python as grain
import numpy as np
import tensorflow_datasets as tfds

from recyclelora_jax.data import codecs, transforms

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Source:
    """A dataset split; `subset`: how many records to draw at random (0: all of them; the
    configs state GTAV's 12,403 themselves)."""

    builder: str
    split: str
    data_dir: str
    subset: int = 0


class MixedSource(grain.RandomAccessDataSource):
    """Concatenation of subsets of TFDS data sources, in a seeded fixed order.

    Data sources are opened lazily in each process (workers included), so pickling is cheap.
    """

    def __init__(self, sources: Sequence[Source], seed: int):
        self.sources = list(sources)
        self.seed = seed
        self._opened: list | None = None
        parts = []
        for k, (source, n) in enumerate(zip(self.sources, self._lengths(), strict=True)):
            size = source.subset
            if size > n:
                log.warning(
                    "%s has %d records, fewer than the subset %d: using all", source, n, size
                )
            rng = np.random.default_rng([seed, k])
            picked = (
                np.sort(rng.choice(n, size, replace=False)) if size and size < n else np.arange(n)
            )
            parts.append(np.stack([np.full(len(picked), k), picked], 1))
        records = np.concatenate(parts)
        self.records = records[np.random.default_rng([seed, len(parts)]).permutation(len(records))]

    def _lengths(self) -> list[int]:
        return [len(ds) for ds in self._data_sources()]

    def _data_sources(self) -> list:
        if self._opened is None:
            self._opened = [
                tfds.data_source(s.builder, split=s.split, data_dir=s.data_dir)
                for s in self.sources
            ]
        return self._opened

    def __getstate__(self):
        return {**self.__dict__, "_opened": None}

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:  # grain checks it when restoring an iterator state
        return f"MixedSource({self.sources}, seed={self.seed})"

    def __getitem__(self, index: int) -> dict:
        k, i = self.records[index]
        return self._data_sources()[k][int(i)]


class TrainAugment(grain.RandomMapTransform):
    """Decodes a stored example and applies RECIPE.md §6's augmentation with the record's generator.

    Resize scales follow the crop as in the reference (512 crop: shorter side 256…1024, longer
    side ≤ 2048), so smaller crops (smoke runs, the demo) keep the same zoom range.
    """

    def __init__(self, crop_size: tuple[int, int], pad_raw: bool = False):
        self.crop_size = tuple(crop_size)
        self.pad_raw = pad_raw
        self.scales = transforms.scales_for(min(self.crop_size))
        self.max_size = 4 * min(self.crop_size)

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        name = element["file_name"]
        image = codecs.decode_image(element["image"], name)
        label = codecs.decode_label(element["label"], name)
        image, label = transforms.train_augment(
            image, label, rng, self.crop_size, self.scales, self.max_size, pad_raw=self.pad_raw
        )
        return {"image": image, "label": label}


def _ensure_absl_flags() -> None:
    """grain's worker processes read absl flags; a plain script has not parsed them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class GlobalBatchSampler:
    """One shuffled stream for the whole job, cut into global batches of ``local_batch ×
    shard_count``; process ``p`` reads its contiguous ``local_batch`` slice of every global batch.

    grain's data loader asks shard ``p`` for the sampler indices ``p, p + P, p + 2P, ...``; this
    sampler maps them onto global stream positions, so the global batch (contents, order and each
    record's random generator, keyed on its global position) is the same for any process count.
    Every epoch of the stream is a fresh permutation of all records.
    """

    def __init__(
        self, num_records: int, seed: int, local_batch: int, shard_index: int, shard_count: int
    ):
        self._stream = grain.IndexSampler(
            num_records=num_records,
            shard_options=grain.NoSharding(),
            shuffle=True,
            num_epochs=None,
            seed=seed,
        )
        self._shard_options = grain.ShardOptions(shard_index, shard_count)
        self.local_batch = local_batch
        self.shard_count = shard_count

    def global_position(self, index: int) -> int:
        shard, k = index % self.shard_count, index // self.shard_count
        batch, offset = divmod(k, self.local_batch)
        return (batch * self.shard_count + shard) * self.local_batch + offset

    def __getitem__(self, index: int):
        return self._stream[self.global_position(index)]

    def __repr__(self) -> str:  # grain compares it when restoring an iterator state
        return (
            f"GlobalBatchSampler({self._stream!r}, local_batch={self.local_batch}, "
            f"shard={self._shard_options.shard_index}/{self.shard_count})"
        )


def make_sampler(
    num_records: int, seed: int, shard_index: int, shard_count: int, local_batch: int = 1
) -> GlobalBatchSampler:
    """Infinite, per-epoch reshuffled sampler of this process's slices of the global batches."""
    return GlobalBatchSampler(num_records, seed, local_batch, shard_index, shard_count)


class BatchIterator:
    """Stacks `batch_size` consecutive examples; its state is the example iterator's state."""

    def __init__(self, examples: grain.DataLoaderIterator, batch_size: int):
        self.examples = examples
        self.batch_size = batch_size

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict:
        items = [next(self.examples) for _ in range(self.batch_size)]
        return {key: np.stack([item[key] for item in items]) for key in items[0]}

    def get_state(self) -> bytes:
        return self.examples.get_state()

    def set_state(self, state: bytes) -> None:
        self.examples.set_state(state)


@dataclasses.dataclass
class TrainLoader:
    """Iterable over training batches; each `iter()` starts from the beginning of the stream."""

    examples: grain.DataLoader
    batch_size: int

    def __iter__(self) -> BatchIterator:
        return BatchIterator(iter(self.examples), self.batch_size)


def make_train_loader(
    sources: Sequence[Source | tuple],
    *,
    batch_size: int,
    crop_size: tuple[int, int] = (512, 512),
    pad_raw: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
    worker_buffer_size: int = 2,
) -> TrainLoader:
    """Infinite loader of {"image": (b, H, W, 3) float32 normalised, "label": (b, H, W) int32}.

    `batch_size` is per process; shards default to this JAX process among all of them.
    """
    if shard_index is None or shard_count is None:
        import jax

        shard_index, shard_count = jax.process_index(), jax.process_count()
    data = MixedSource([s if isinstance(s, Source) else Source(*s) for s in sources], seed)
    if len(data) < shard_count * batch_size:
        raise ValueError(
            f"{len(data)} records cannot fill batches of {batch_size} on {shard_count} shards"
        )
    sampler = make_sampler(len(data), seed, shard_index, shard_count, batch_size)
    if num_workers:
        _ensure_absl_flags()
    examples = grain.DataLoader(
        data_source=data,
        sampler=sampler,
        operations=[TrainAugment(crop_size, pad_raw)],
        worker_count=num_workers,
        worker_buffer_size=worker_buffer_size * batch_size,
    )
    return TrainLoader(examples, batch_size)
