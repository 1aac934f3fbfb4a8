"""The experiment configuration: the paper's recipe as defaults, variants as small overrides.

Config files in ``configs/`` are big_vision-style ``get_config(arg)`` functions; ``arg`` is a
comma-separated list of flags and ``key=value`` pairs (``configs/g2cbm.py:smoke,seed=1``). Every
number of SPEC §3-§6 lives here once; baselines and ablations change only what differs.
"""

from __future__ import annotations

import ast

import ml_collections

CITYSCAPES_CLASSES = 19
# A Mask2Former small enough for CPU smoke runs and tests (the matcher needs queries >= 19).
TINY_MASK2FORMER = dict(
    num_queries=19,
    dim=32,
    encoder_layers=1,
    decoder_layers=1,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
    loss=dict(num_points=256),
)
TARGETS_ALL_LINEAR = r"blocks_\d+/(attn/(qkv|proj)|mlp/(fc1|fc2|w12|w3))"


def parse_arg(arg: str | None) -> dict:
    """``"smoke,seed=1"`` -> ``{"smoke": True, "seed": 1}`` (values parsed as Python literals)."""
    out: dict = {}
    for part in filter(None, (arg or "").split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            out[key.strip()] = True
            continue
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def base_config() -> ml_collections.ConfigDict:
    """GTAV -> Cityscapes/BDD100K/Mapillary with RecycleLoRA (r_main 32 + r_sub 4), SPEC §3-§6."""
    c = ml_collections.ConfigDict()
    c.name = "g2cbm"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.backbone = dict(
        arch="vitl14",
        weights="",  # official .pth, HF model.safetensors or a converted file; "" = random
        patch_size=16,  # the reference converts the 14x14 patch kernel to 16x16 ...
        pos_grid=32,  # ... and the 37x37 position embedding to 32x32 (512 / 16)
        out_indices=(7, 11, 15, 23),
        interpolate_offset=0.1,
        remat=False,
        dtype="float32",  # compute dtype ("bfloat16" for mixed precision)
        param_dtype="float32",  # storage of the frozen weights ("bfloat16" halves memory)
    )
    c.model.head = dict(
        name="mask2former",
        num_classes=CITYSCAPES_CLASSES,
        num_queries=100,
        dim=256,
        encoder_layers=6,
        decoder_layers=9,
    )

    c.peft = dict(
        method="recyclelora",
        r_main=32,
        r_sub=4,
        alpha=1.0,
        targets=TARGETS_ALL_LINEAR,
        blocks=(0, 10**6),  # [first, last) block to adapt
        train_adapted_bias=False,
        train_backbone=False,  # full fine-tuning
        cache=True,  # reuse the initialised tree from the workdir on restart
    )

    c.optim = dict(
        lr=1e-4,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.05,
        weight_decay_min=1e-5,  # cosine-annealed per step (mmengine semantics)
        power=0.9,  # polynomial LR decay to 0
        warmup_steps=0,
        main_lr_mult=1.0,
        sub_lr_mult=0.5,
        backbone_lr_mult=0.5,  # for trainable non-adapter backbone leaves (SoMA biases, full FT)
        ema_momentum=0.0,  # 0 = no EMA
        ema_start=0,
    )

    c.train = dict(
        steps=40_000,
        batch_size=4,  # global
        grad_accum=1,
        log_every=50,
        checkpoint_every=4_000,
        eval_every=4_000,
        keep_checkpoints=3,
    )

    c.data = dict(
        data_dir="data/tfds",
        sources=(("dg_gtav", "train", 12_403),),  # (builder, split, random subset size or 0)
        crop_size=512,
        workers=4,
    )

    c.eval = dict(
        datasets=("dg_cityscapes", "dg_bdd100k", "dg_mapillary"),
        split="validation",
        mode="slide",
        crop_size=512,
        stride=341,
        max_images=0,  # 0 = all
    )

    c.mesh = dict(data=-1, fsdp=1)
    return c


METHODS = (
    "recyclelora",
    "main-only",
    "sub-only",
    "swapped",
    "soma",
    "pissa",
    "milora",
    "lora",
    "full",
    "frozen",
)


def apply_method(c: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
    """Switch the PEFT method; SoMA brings its own recipe (SPEC §8)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} unknown; known: {', '.join(METHODS)}")
    c.peft.method = method
    if method == "soma":
        c.peft.update(r_main=16, alpha=16.0, blocks=(8, 10**6), train_adapted_bias=True)
        c.optim.update(backbone_lr_mult=0.5, ema_momentum=2e-4, ema_start=12_000)
    elif method in ("pissa", "milora", "lora"):
        # One adapter with RecycleLoRA's total rank and scale 1/r: same budget, same alpha.
        c.peft.update(r_main=c.peft.r_main + c.peft.r_sub)
    elif method == "full":
        c.optim.update(backbone_lr_mult=0.1)
    return c


def apply_common_args(c: ml_collections.ConfigDict, args: dict) -> ml_collections.ConfigDict:
    """Flags shared by every config file: ``method=NAME``, ``smoke`` and ``seed=N``."""
    unknown = sorted(set(args) - {"method", "smoke", "seed"})
    if unknown:
        raise ValueError(f"unknown config arguments {unknown}; known: method, smoke, seed")
    if "seed" in args:
        c.seed = int(args["seed"])
    if "method" in args:
        apply_method(c, args["method"])
    if args.get("smoke"):
        smoke(c)
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink any config to a laptop-CPU run of a few steps on the synthetic data."""
    c.model.backbone.update(
        arch="tiny", weights="", patch_size=8, pos_grid=8, out_indices=(0, 1, 2, 3)
    )
    if c.model.head.name == "mask2former":
        c.model.head.update(TINY_MASK2FORMER)
    first, stop = c.peft.blocks
    # SoMA's 8 frozen blocks of 24 become 1 of the tiny backbone's 4.
    c.peft.update(
        r_main=min(c.peft.r_main, 4), r_sub=min(c.peft.r_sub, 2), blocks=(min(first, 1), stop)
    )
    c.train.update(steps=6, batch_size=2, log_every=1, checkpoint_every=3, eval_every=6)
    c.data.update(
        data_dir="runs/synthetic/tfds",
        sources=(("dg_gtav", "train", 0),),
        crop_size=64,
        workers=0,
    )
    c.eval.update(datasets=("dg_cityscapes",), mode="whole", crop_size=64, stride=43, max_images=4)
    return c
