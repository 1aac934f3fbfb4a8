"""A stand-in "foundation model" for places without pretrained DINOv2 weights (tests, the demo).

No weights can be downloaded here, so the demo pretrains a small DINOv2-architecture ViT by
masked-image modelling on unlabelled images of every style, as DINOv2 itself never sees
segmentation labels: patches are replaced by the backbone's own ``mask_token`` and a linear
decoder reconstructs their (per-patch normalised) pixels. RecycleLoRA then adapts this frozen
backbone exactly as it would adapt the real one.
"""

from __future__ import annotations

from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from recyclelora_jax.models.dinov2 import DinoV2


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/p * W/p, p*p*C), row-major over the patch grid."""
    b, h, w, c = images.shape
    gh, gw = h // patch, w // patch
    x = images[:, : gh * patch, : gw * patch].reshape(b, gh, patch, gw, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, patch * patch * c)


class MaskedImageModel(nn.Module):
    backbone: DinoV2

    @nn.compact
    def __call__(self, images: jax.Array, masks: jax.Array) -> jax.Array:
        tokens = self.backbone(images, masks)["x_norm_patchtokens"]
        p = self.backbone.arch.patch_size
        return nn.Dense(p * p * images.shape[-1], name="decoder")(tokens)


def mim_loss(pred: jax.Array, images: jax.Array, masks: jax.Array, patch: int) -> jax.Array:
    """Mean squared error on masked patches, targets normalised per patch (as MAE)."""
    target = patchify(images, patch)
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
    per_patch = ((pred - target) ** 2).mean(-1)
    return (per_patch * masks).sum() / jnp.maximum(masks.sum(), 1)


def pretrain_mim(
    backbone: DinoV2,
    batches: Iterator[np.ndarray],
    *,
    steps: int,
    lr: float = 1e-3,
    mask_ratio: float = 0.5,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Train ``backbone`` by masked-image modelling on normalised image batches (B, H, W, 3);
    returns the backbone's parameters (the decoder is thrown away)."""
    model = MaskedImageModel(backbone)
    first = np.asarray(next(batches))
    b, h, w, _ = first.shape
    p = backbone.arch.patch_size
    n_patches = (h // p) * (w // p)
    key = jax.random.key(seed)
    params = model.init(key, first, jnp.zeros((b, n_patches), bool))["params"]
    tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=0.05)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, images, key):
        scores = jax.random.uniform(key, (images.shape[0], n_patches))
        masks = scores < jnp.quantile(scores, mask_ratio, axis=1, keepdims=True)

        def loss_fn(params):
            pred = model.apply({"params": params}, images, masks)
            return mim_loss(pred, images, masks, p)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    bar = tqdm(range(steps), desc="pretrain (MIM)", disable=not progress)
    for i in bar:
        images = first if i == 0 else np.asarray(next(batches))
        params, opt_state, loss = step(params, opt_state, images, jax.random.fold_in(key, i))
        if i % 10 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    return jax.device_get(params["backbone"])
