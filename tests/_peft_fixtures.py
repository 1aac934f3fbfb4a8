"""A tiny random DINOv2 shared by the PEFT, optimizer and analysis tests."""

import jax
import numpy as np

from recyclelora_jax.models.dinov2 import DinoV2, DinoV2Arch

# 4 blocks of width 64; 32 px images on 8 px patches give the 4x4 pretrained grid.
TINY = DinoV2Arch(embed_dim=64, depth=4, num_heads=2, patch_size=8, pos_grid=4)
OUT = (1, 3)


def tiny_backbone(seed: int = 0):
    """(params, images): random weights with LayerScale 1 so that every block matters."""
    images = np.random.default_rng(seed).standard_normal((2, 32, 32, 3)).astype(np.float32)
    model = DinoV2(TINY, out_indices=OUT, layerscale_init=1.0)
    params = jax.jit(model.init)(jax.random.key(seed), images)["params"]  # jit: faster than eager
    return params, images


def run_backbone(params, images, layout=()):
    """All non-empty outputs of the backbone built with ``layout``, as a list of arrays."""
    model = DinoV2(TINY, out_indices=OUT, layerscale_init=1.0, adapters=layout)
    outputs = model.apply({"params": params}, images)  # eager: cheaper than a compile here
    return [x for x in jax.tree.leaves(outputs) if x.size]
