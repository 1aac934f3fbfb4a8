"""A stand-in "foundation model" for places without pretrained DINOv2 weights (tests, the demo).

No weights can be downloaded here, so the demo pretrains a small DINOv2-architecture ViT on
unlabelled images of every style with a style-invariant objective: dense contrast across two
photometric views of the same image (colour jitter, casts, greyscale, uneven light, blur, noise),
as in pixel-level contrastive learning (PixPro, DenseCL). Each patch of one view must pick out
the patch at the same scene position in the other view among every patch of the batch, so its
feature must keep what survives a re-rendering -- shape and context -- and drop colour, light
and noise, which is what differs between rendering styles. Some of the student's patches are
replaced by the backbone's ``mask_token`` (context must fill them in), and the two views are cut
at different patch offsets, so a patch cannot be matched by its position alone. Segmentation
labels are never used, as DINOv2 never sees them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from recyclelora_jax.data.transforms import MEAN, STD, normalize
from recyclelora_jax.models.dinov2 import DinoV2


class DenseContrast(nn.Module):
    """Backbone plus a projection MLP on every patch token, L2-normalised: (L, B, N, D), one
    level (the last block's normed tokens) or, with ``every_block``, one per block in the
    backbone's ``out_indices`` (each LayerNormed, its own projection) -- the blocks a linear
    probe reads."""

    backbone: DinoV2
    hidden: int = 256
    dim: int = 64
    every_block: bool = False

    @nn.compact
    def __call__(self, images: jax.Array, masks: jax.Array | None = None) -> jax.Array:
        out = self.backbone(images, masks)
        if self.every_block:
            b = images.shape[0]
            levels = [
                nn.LayerNorm(use_scale=False, use_bias=False)(f.reshape(b, -1, f.shape[-1]))
                for f in out["features"]
            ]
        else:
            levels = [out["x_norm_patchtokens"]]
        zs = []
        for x in levels:
            x = nn.Dense(self.dim)(nn.gelu(nn.Dense(self.hidden)(x)))
            zs.append(x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-6))
        return jnp.stack(zs)


def photometric_view(key: jax.Array, images: jax.Array) -> jax.Array:
    """A random photometric re-rendering of normalised images (B, H, W, 3): brightness,
    contrast, saturation, hue rotation, per-channel cast, greyscale, a smooth light field, blur
    and noise, each drawn per image. Geometry is unchanged."""
    b, h, w, _ = images.shape
    ks = jax.random.split(key, 10)
    mean, std = jnp.asarray(MEAN / 255), jnp.asarray(STD / 255)
    x = images * std + mean

    def u(k, lo, hi, shape=(b, 1, 1, 1)):
        return jax.random.uniform(k, shape, minval=lo, maxval=hi)

    x = x * u(ks[0], 0.6, 1.4)
    mu = x.mean((1, 2, 3), keepdims=True)
    x = (x - mu) * u(ks[1], 0.6, 1.4) + mu
    grey = (x * jnp.asarray([0.299, 0.587, 0.114])).sum(-1, keepdims=True)
    theta = u(ks[2], -0.6, 0.6)[..., 0]  # hue: rotate the chroma about the grey axis
    c, s = jnp.cos(theta), jnp.sin(theta)
    e1 = jnp.asarray([1.0, -1.0, 0.0]) / math.sqrt(2)
    e2 = jnp.asarray([1.0, 1.0, -2.0]) / math.sqrt(6)
    chroma = x - grey
    p, q = chroma @ e1, chroma @ e2
    chroma = (c * p - s * q)[..., None] * e1 + (s * p + c * q)[..., None] * e2
    sat = jnp.where(u(ks[3], 0, 1) < 0.2, 0.0, u(ks[4], 0.3, 1.6))
    x = grey + chroma * sat
    x = x * u(ks[5], 0.75, 1.25, (b, 1, 1, 3))
    light = jax.image.resize(u(ks[6], -1, 1, (b, 3, 3, 1)), (b, h, w, 1), "cubic")
    x = x * (1 + 0.3 * light)
    blurred = (x + jnp.roll(x, 1, 1) + jnp.roll(x, -1, 1)) / 3
    blurred = (blurred + jnp.roll(blurred, 1, 2) + jnp.roll(blurred, -1, 2)) / 3
    alpha = u(ks[7], 0, 1) * (u(ks[8], 0, 1) < 0.5)
    x = (1 - alpha) * x + alpha * blurred
    x = x + u(ks[9], 0, 0.06) * jax.random.normal(jax.random.fold_in(key, 1), x.shape)
    return (jnp.clip(x, 0, 1) - mean) / std


def native_crops(images: np.ndarray, crop: int, batch: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Endless normalised batches (B, crop, crop, 3) of random crops of raw images (N, H, W, 3)
    at their stored scale, half of them flipped: the scale every evaluation reads them at."""
    rng = np.random.default_rng(seed)
    h, w = images.shape[1:3]
    while True:
        out = []
        for i in rng.choice(len(images), batch):
            y, x = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
            c = images[i, y : y + crop, x : x + crop]
            out.append(c[:, ::-1] if rng.random() < 0.5 else c)
        yield normalize(np.stack(out))


def _crop(images: jax.Array, offsets: jax.Array, size: int) -> jax.Array:
    """Per-image square crops of side `size` at (row, col) pixel offsets (B, 2)."""
    return jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (size, size, 3)))(
        images, offsets
    )


def _aligned(grid: int, src: jax.Array, dst: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For views cut at patch offsets ``src`` and ``dst`` (B, 2): the index in the other view's
    flattened patch grid of each of this view's patches (B, grid²) and whether it exists."""
    d = src - dst
    r = jnp.arange(grid)[None, :, None] + d[:, 0, None, None]  # (B, grid, 1)
    c = jnp.arange(grid)[None, None, :] + d[:, 1, None, None]  # (B, 1, grid)
    valid = (r >= 0) & (r < grid) & (c >= 0) & (c < grid)
    index = jnp.clip(r, 0, grid - 1) * grid + jnp.clip(c, 0, grid - 1)
    return index.reshape(len(d), -1), valid.reshape(len(d), -1)


def dense_contrastive_loss(
    za: jax.Array,
    zb: jax.Array,
    index: jax.Array,
    valid: jax.Array,
    temperature: float,
) -> jax.Array:
    """InfoNCE of each patch of view a (B, N, D) against every patch of view b in the batch,
    the positive being the same scene position (``index`` into b's grid, where ``valid``)."""
    b, n, _ = za.shape
    logits = za.reshape(b * n, -1) @ zb.reshape(b * n, -1).T / temperature
    target = (index + n * jnp.arange(b)[:, None]).reshape(-1)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), target[:, None], 1)[:, 0]
    return (nll * valid.reshape(-1)).sum() / valid.sum().clip(1)


def pretrain_contrastive(
    backbone: DinoV2,
    batches: Iterator[np.ndarray],
    *,
    steps: int,
    lr: float = 1e-3,
    shift: int = 2,
    mask_ratio: float = 0.3,
    temperature: float = 0.2,
    every_block: bool = False,
    seed: int = 0,
    progress: bool = True,
    on_loss: Callable[[float], None] | None = None,
) -> dict:
    """Train ``backbone`` on normalised image batches (B, S, S, 3); the two views of a batch are
    (S - shift·patch)-pixel crops at independent patch offsets. ``on_loss`` receives every
    step's loss. Returns the backbone's parameters (the projection is thrown away)."""
    model = DenseContrast(backbone, every_block=every_block)
    first = np.asarray(next(batches))
    b, size = first.shape[0], first.shape[1]
    patch = backbone.arch.patch_size
    view, grid = size - shift * patch, (size - shift * patch) // patch
    key = jax.random.key(seed)
    params = model.init(key, first[:, :view, :view])["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps)
    tx = optax.adamw(schedule, weight_decay=0.05)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, images, key):
        k_off, k_a, k_b, k_mask, k_ratio = jax.random.split(key, 5)
        offsets = jax.random.randint(k_off, (2, b, 2), 0, shift + 1)
        va, vb = (
            photometric_view(k, _crop(images, o * patch, view))
            for k, o in zip((k_a, k_b), offsets, strict=True)
        )
        masks = jax.random.uniform(k_mask, (b, grid * grid)) < mask_ratio * jax.random.uniform(
            k_ratio, (b, 1)
        )
        ab, ba = _aligned(grid, offsets[0], offsets[1]), _aligned(grid, offsets[1], offsets[0])

        def loss_fn(params):
            za = model.apply({"params": params}, va, masks)
            zb = model.apply({"params": params}, vb)
            return sum(
                dense_contrastive_loss(za_l, zb_l, *ab, temperature)
                + dense_contrastive_loss(zb_l, za_l, *ba, temperature)
                for za_l, zb_l in zip(za, zb, strict=True)
            ) / (2 * len(za))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    bar = tqdm(range(steps), desc="pretrain (dense contrast)", disable=not progress)
    for i in bar:
        images = first if i == 0 else np.asarray(next(batches))
        params, opt_state, loss = step(params, opt_state, images, jax.random.fold_in(key, i))
        if on_loss is not None:
            on_loss(float(loss))
        if i % 10 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    return jax.device_get(params["backbone"])
