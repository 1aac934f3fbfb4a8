"""Datasets (TFDS builders `dg_*`, registered on import), input pipelines and synthetic data."""

from recyclelora_jax.data import builders
from recyclelora_jax.data.labels import CLASS_NAMES, IGNORE, NUM_CLASSES

__all__ = ["CLASS_NAMES", "IGNORE", "NUM_CLASSES", "builders"]
