"""The ViT-S/B/L training step of ``train_step.py`` and ``train_parts.py``, built once for both:
the JAX config and state (the package's own ``train.trainer`` pieces) and the PyTorch reference
(``transformers.Dinov2Model`` with the same adapters, transformers' Mask2Former pixel decoder,
transformer module and ``Mask2FormerLoss``, ``torch.optim.AdamW``), on the same random batch.

Nothing here imports torch or jax at module level, so a parent process stays free of both.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recyclelora_jax.classes import IGNORE
from recyclelora_jax.classes import NUM_CLASSES as CLASSES

# size -> (width, depth, heads, out_indices): the recipe's ViT-L blocks, quarter ends for S/B.
SIZES = {
    "s": (384, 12, 6, (2, 5, 8, 11)),
    "b": (768, 12, 12, (2, 5, 8, 11)),
    "l": (1024, 24, 16, (7, 11, 15, 23)),
}
PATCH = 16
RANKS = (("main", 32), ("sub", 4))
LR, WD, WD_MIN, POWER, TOTAL_STEPS = 1e-4, 0.05, 1e-5, 0.9, 40_000
LR_MULT = {"main": 1.0, "sub": 0.5, "head_no_decay": 1.0, "head": 1.0}


def add_step_args(p: argparse.ArgumentParser) -> None:
    """The options that decide the step, shared by both benchmarks."""
    p.add_argument("--sizes", default="s,b", help="comma list of s, b, l (default: %(default)s)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--threads", type=int, default=2, help="cores / threads for both")
    p.add_argument(
        "--remat",
        action="store_true",
        help="JAX recomputes each backbone block in the backward (model.backbone.remat)",
    )
    p.add_argument(
        "--scan",
        action="store_true",
        help="JAX runs the backbone blocks and the deformable encoder layers as lax.scans, each "
        "layer recomputed in the backward (scan_layers + remat on both: the least memory)",
    )
    p.add_argument(
        "--workdir",
        default="",
        help="keep the JAX adapter-init cache here across runs (default: a temporary folder)",
    )
    p.add_argument("--allow-loaded", action="store_true", help="run (flagged) on a busy machine")


def check_step_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    unknown = set(args.sizes.split(",")) - SIZES.keys()
    if unknown:
        p.error(f"--sizes: unknown {sorted(unknown)}; choose from {sorted(SIZES)}")
    if args.crop % PATCH:
        p.error(f"--crop {args.crop} must be a multiple of the patch size {PATCH}")


def make_batch(batch: int, crop: int, seed: int = 0) -> dict:
    """Random image and a blocky label map (16-px blocks of random classes, 5 % ignore), the
    same numpy arrays for both frameworks."""
    import numpy as np

    rng = np.random.default_rng(seed)
    image = rng.standard_normal((batch, crop, crop, 3), dtype=np.float32)
    blocks = rng.integers(0, CLASSES, (batch, crop // 16, crop // 16))
    label = blocks.repeat(16, 1).repeat(16, 2).astype(np.int32)
    label[rng.random(label.shape) < 0.05] = IGNORE
    return {"image": image, "label": label}


def timed_steps(step: Callable[[], float], warmup: int, steps: int) -> tuple[list[float], float]:
    """Run ``step()`` (which returns the loss, synchronised) ``warmup`` + ``steps`` times;
    returns the timed seconds and the last loss."""
    for _ in range(warmup):
        step()
    times, loss = [], float("nan")
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    return times, loss


# ----------------------------------------------------------------------------------------- JAX


def jax_state(size: str, args: argparse.Namespace) -> tuple[Any, dict, Any, dict, dict, float]:
    """``(setup, state, frozen, abstract state, batch, build seconds)`` of the package's step
    for ``size`` (``train.trainer.initial_train_state``, the RRQR adapter init included)."""
    import jax.numpy as jnp

    from recyclelora_jax.config import base_config
    from recyclelora_jax.train.sharding import make_mesh
    from recyclelora_jax.train.trainer import initial_train_state

    _, _, _, out_indices = SIZES[size]
    cfg = base_config()
    cfg.model.backbone.update(
        arch=f"vit{size}14",
        weights="",
        pos_grid=args.crop // PATCH,
        out_indices=out_indices,
        remat=args.remat or args.scan,
        scan_layers=args.scan,
    )
    cfg.model.head.update(scan_layers=args.scan, remat_layers=args.scan)
    cfg.train.batch_size = args.batch
    cfg.data.crop_size = args.crop
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        setup, state, frozen, abstract = initial_train_state(
            cfg, Path(args.workdir or tmp), make_mesh(**cfg.mesh)
        )
    build_s = time.perf_counter() - start
    batch = {k: jnp.asarray(v) for k, v in make_batch(args.batch, args.crop).items()}
    return setup, state, frozen, abstract, batch, build_s


# ------------------------------------------------------------------------------------- PyTorch


def torch_modules() -> tuple[type, type]:
    """The reference's nn.Module classes (defined here so the parent never imports torch)."""
    import torch
    from torch import nn

    class LowRank(nn.Module):
        """``scale * sum_i (x a_i) b_i`` of one (possibly fused) layer; the ``x a_i`` products
        of the current input are computed once by ``begin`` and shared by every slice."""

        def __init__(self, n_in: int, n_out: int, scale: float) -> None:
            super().__init__()
            self.scale = scale
            self.a = nn.ParameterDict(
                {n: nn.Parameter(torch.randn(n_in, r) / math.sqrt(n_in)) for n, r in RANKS}
            )
            self.b = nn.ParameterDict(
                {n: nn.Parameter(torch.randn(r, n_out) * 1e-3) for n, r in RANKS}
            )
            self.hidden = None

        def begin(self, x: torch.Tensor) -> None:
            self.hidden = {n: x @ a for n, a in self.a.items()}

        def end(self) -> None:
            self.hidden = None

        def forward(self, part: slice) -> torch.Tensor:
            return self.scale * sum(h @ self.b[n][:, part] for n, h in self.hidden.items())

    class Adapted(nn.Module):
        """A frozen nn.Linear plus its slice of a low-rank update."""

        def __init__(self, base: nn.Linear, adapter: LowRank, part: slice) -> None:
            super().__init__()
            self.base = base.requires_grad_(False)
            self.adapter = adapter
            self.part = part

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.adapter.hidden is None:  # first slice of this input (q of q/k/v)
                self.adapter.begin(x)
            return self.base(x) + self.adapter(self.part)

    return LowRank, Adapted


def adapt_dinov2(model: Any, scale: float) -> list:
    """Attach the adapters in place: one fused qkv adapter (shared ``x a`` for q, k and v, each
    taking a third of ``b``), and one each on o_proj, fc1, fc2. Returns the adapters."""
    LowRank, Adapted = torch_modules()
    adapters = []
    for layer in model.encoder.layer:
        attn, mlp = layer.attention, layer.mlp
        width = attn.q_proj.in_features
        qkv = LowRank(width, 3 * width, scale)
        for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
            part = slice(i * width, (i + 1) * width)
            setattr(attn, name, Adapted(getattr(attn, name), qkv, part))
        attn.register_forward_hook(lambda *_, a=qkv: a.end())
        adapters.append(qkv)
        for parent, name in ((attn, "o_proj"), (mlp, "fc1"), (mlp, "fc2")):
            base = getattr(parent, name)
            single = LowRank(base.in_features, base.out_features, scale)
            setattr(parent, name, Adapted(base, single, slice(None)))
            parent.register_forward_hook(lambda *_, a=single: a.end())
            adapters.append(single)
    return adapters


def _param_groups(adapters: list, head: Any) -> list[dict]:
    """The recipe's groups: main (lr 1), sub (lr 0.5), head embeddings/norms, rest of head."""
    groups = {name: [] for name in LR_MULT}
    for adapter in adapters:
        for name, _ in RANKS:
            groups[name] += [adapter.a[name], adapter.b[name]]
    no_decay = ("queries_embedder", "queries_features", "level_embed", "norm")
    for name, p in head.named_parameters():
        groups["head_no_decay" if any(k in name for k in no_decay) else "head"].append(p)
    return [{"params": ps, "name": n, "decays": n == "head"} for n, ps in groups.items()]


def schedule(optimizer: Any, step: int) -> None:
    """Poly LR and cosine-annealed weight decay (mmengine closed forms) for ``step``."""
    lr = LR * ((TOTAL_STEPS - min(step, TOTAL_STEPS)) / TOTAL_STEPS) ** POWER
    half = min(step, TOTAL_STEPS) * math.pi / (2 * TOTAL_STEPS)
    for g in optimizer.param_groups:
        g["lr"] = lr * LR_MULT[g["name"]]
        start = WD if g["decays"] else 0.0
        g["weight_decay"] = start * math.cos(half) ** 2 + WD_MIN * math.sin(half) ** 2


@dataclasses.dataclass
class TorchStep:
    """The reference step in its three stages, each a function of the previous one's output,
    so that a benchmark can run them together (``loss``) or apart."""

    backbone: Any
    head: Any
    criterion: Any
    optimizer: Any
    pixels: Any
    labels: Any
    grid: int
    out_indices: tuple[int, ...]
    weights: dict[str, float]

    def maps(self) -> list:
        """The four (B, C, grid, grid) maps of the ``out_indices`` blocks."""
        hidden = self.backbone(self.pixels, output_hidden_states=True).hidden_states
        g = self.grid
        return [hidden[i + 1][:, 1:].transpose(1, 2).unflatten(2, (g, g)) for i in self.out_indices]

    def predictions(self, maps: list) -> tuple[list, list]:
        """Bilinear pyramid, pixel decoder, transformer module and class Linear: the ten
        prediction sets' (mask logits, class logits)."""
        from torch.nn import functional as F

        pyramid = [
            F.interpolate(m, scale_factor=s, mode="bilinear", align_corners=False)
            for m, s in zip(maps, (4.0, 2.0, 1.0, 0.5), strict=True)
        ]
        pix = self.head["pixel"](pyramid)
        dec = self.head["transformer"](pix.multi_scale_features, pix.mask_features)
        logits = [self.head["cls"](h.transpose(0, 1)) for h in dec.intermediate_hidden_states]
        return list(dec.masks_queries_logits), logits

    def set_loss(self, masks: list, logits: list) -> Any:
        """``Mask2FormerLoss`` over all ten sets with the recipe's weights."""
        import torch

        classes = [torch.unique(lab[lab != IGNORE]).long() for lab in self.labels]
        mask_labels = [
            (lab[None] == c[:, None, None]).float()
            for lab, c in zip(self.labels, classes, strict=True)
        ]
        aux = [
            {"masks_queries_logits": m, "class_queries_logits": c}
            for m, c in zip(masks[:-1], logits[:-1], strict=True)
        ]
        terms = self.criterion(masks[-1], logits[-1], mask_labels, classes, aux)
        w = self.weights
        return sum(v * w[n] for k, v in terms.items() for n in w if k.startswith(n))

    def loss(self) -> Any:
        return self.set_loss(*self.predictions(self.maps()))

    def trainable(self) -> int:
        return sum(p.numel() for g in self.optimizer.param_groups for p in g["params"])


def torch_step(size: str, args: argparse.Namespace) -> TorchStep:
    """The reference for ``size`` on the batch of ``make_batch``, seeded, in training mode."""
    import torch
    import transformers
    from transformers.models.mask2former import modeling_mask2former as hf

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    width, depth, heads, out_indices = SIZES[size]
    backbone = transformers.Dinov2Model(
        transformers.Dinov2Config(
            hidden_size=width,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            patch_size=PATCH,
            image_size=args.crop,
        )
    ).train()
    backbone.requires_grad_(False)
    adapters = adapt_dinov2(backbone, scale=1.0 / sum(r for _, r in RANKS))
    config = hf.Mask2FormerConfig(
        num_labels=CLASSES,
        feature_size=256,
        mask_feature_size=256,
        hidden_dim=256,
        encoder_layers=6,
        decoder_layers=10,  # counts the initial prediction: 9 layers, 10 supervised sets
        num_queries=100,
        dim_feedforward=2048,
        encoder_feedforward_dim=1024,
        common_stride=4,
        feature_strides=[4, 8, 16, 32],
        train_num_points=12544,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
        class_weight=2.0,
        mask_weight=5.0,
        dice_weight=5.0,
        no_object_weight=0.1,
    )
    head = torch.nn.ModuleDict(
        {
            "pixel": hf.Mask2FormerPixelDecoder(config, feature_channels=[width] * 4),
            "transformer": hf.Mask2FormerTransformerModule(config.feature_size, config),
            "cls": torch.nn.Linear(config.hidden_dim, CLASSES + 1),
        }
    ).train()
    with torch.no_grad():
        head["pixel"].level_embed.normal_()  # created uninitialised outside a full model
    weights = {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
    optimizer = torch.optim.AdamW(
        _param_groups(adapters, head), lr=LR, betas=(0.9, 0.999), eps=1e-8
    )
    data = make_batch(args.batch, args.crop)
    return TorchStep(
        backbone=backbone,
        head=head,
        criterion=hf.Mask2FormerLoss(config, weights),
        optimizer=optimizer,
        pixels=torch.from_numpy(data["image"]).permute(0, 3, 1, 2).contiguous(),
        labels=torch.from_numpy(data["label"]),
        grid=args.crop // PATCH,
        out_indices=out_indices,
        weights=weights,
    )
