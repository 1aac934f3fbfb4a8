"""Datasets (TFDS builders `dg_*`, registered on import), input pipelines and synthetic data."""

from recyclelora_jax.classes import CLASS_NAMES, IGNORE, NUM_CLASSES
from recyclelora_jax.data import builders

__all__ = ["CLASS_NAMES", "IGNORE", "NUM_CLASSES", "builders"]
