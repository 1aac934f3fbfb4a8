"""RecycleLoRA in JAX/Flax. ``load_mmseg_checkpoint`` reads a checkpoint of the official code."""

from typing import Any


def __getattr__(name: str) -> Any:
    # Lazy, so that importing a light submodule (``recyclelora_jax.pth``) does not load JAX.
    if name == "load_mmseg_checkpoint":
        from recyclelora_jax.official import load_mmseg_checkpoint

        return load_mmseg_checkpoint
    raise AttributeError(f"module 'recyclelora_jax' has no attribute {name!r}")
