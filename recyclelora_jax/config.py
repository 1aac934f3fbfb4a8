"""The experiment configuration: the paper's recipe as defaults, variants as small overrides.

Config files in ``configs/`` are big_vision-style ``get_config(arg)`` functions; ``arg`` is a
comma-separated list of flags and ``key=value`` pairs (``configs/g2cbm.py:smoke,seed=1``). Every
number of RECIPE.md §3-§6 lives here once; baselines and ablations change only what differs.
"""

from __future__ import annotations

import ast
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypedDict

import ml_collections

from recyclelora_jax.classes import NUM_CLASSES

FROZEN = "frozen"  # the group of parameters that never train
# The project's one small Mask2Former (``Mask2FormerHead`` arguments), for smoke runs, tests and
# benchmarks on the "tiny" backbone (the matcher needs queries >= 19 classes).
TINY_MASK2FORMER = dict(
    num_queries=19,
    dim=32,
    encoder_layers=1,
    decoder_layers=1,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
)

# How every head parameter trains (official mmseg ``custom_keys``, longest key wins there: the
# decoder's ``query_embed`` and ``level_embed`` and all norms without weight decay; ``query_feat``
# and the pixel decoder's level embedding match no key and keep the base decay).
HEAD_PARAMS = (
    (r"^head/transformer_decoder/(query_embed|level_embed)$", "head_no_decay"),
    (r"^head/.*norm", "head_no_decay"),
    (r"^head/", "head"),
)
# Adapter leaves and the biases of adapted layers are labelled from the adapters actually
# attached (``adapters[i].groups`` / ``.bias``), before these rules; the rest of the backbone:
FROZEN_BACKBONE = ((r"^backbone/", FROZEN),)


class SourceEntry(TypedDict):
    """A training source: TFDS builder, split (slices allowed), size of its random subset
    (0 = all), own data dir ("" = ``data.data_dir``)."""

    builder: str
    split: str
    subset: int
    data_dir: str


class EvalEntry(TypedDict):
    """An evaluation set: display name ("" = the builder's without ``dg_``), TFDS builder,
    split ("" = ``eval.split``), data dir ("" = ``data.data_dir``), resize profile ("" = the
    builder's)."""

    name: str
    builder: str
    split: str
    data_dir: str
    profile: str


SOURCE_DEFAULTS = SourceEntry(builder="", split="train", subset=0, data_dir="")
EVAL_DEFAULTS = EvalEntry(name="", builder="", split="", data_dir="", profile="")


def _entries(value: Any, key: str, defaults: Mapping[str, Any]) -> list[dict]:
    """``value``'s entries (dicts of named fields, in order) with every field filled in. The
    positional tuples of configs and checkpoints written before (fields in ``defaults``' order;
    a bare string is the builder) still load, with a FutureWarning spelling out the new form."""
    old = [i for i, e in enumerate(value) if not hasattr(e, "keys")]
    value = [
        dict(e)
        if hasattr(e, "keys")
        else {"builder": e}
        if isinstance(e, str)
        else dict(zip(defaults, e, strict=False))
        for e in value
    ]
    if old:
        warnings.warn(
            f"{key}{old} as positional tuples is deprecated; write {key} = {tuple(value)!r}",
            FutureWarning,
            stacklevel=3,
        )
    out = []
    for i, entry in enumerate(value):
        unknown = sorted(set(entry) - set(defaults))
        if unknown or not entry.get("builder"):
            raise ValueError(
                f"{key}[{i}]: unknown fields {unknown} or no builder; fields: {', '.join(defaults)}"
            )
        out.append({**defaults, **entry})
    return out


def data_sources(cfg: ml_collections.ConfigDict) -> list[SourceEntry]:
    """``data.sources``, in the order they are concatenated."""
    return _entries(cfg.data.sources, "data.sources", SOURCE_DEFAULTS)


def eval_datasets(cfg: ml_collections.ConfigDict) -> list[EvalEntry]:
    """``eval.datasets``, each with its display name."""
    sets = _entries(cfg.eval.datasets, "eval.datasets", EVAL_DEFAULTS)
    for e in sets:
        e["name"] = e["name"] or e["builder"].removeprefix("dg_")
    return sets


def recyclelora_adapters(main: int = 32, sub: int = 4, alpha: float = 1.0) -> tuple[dict, ...]:
    """The paper's adapter table: RRQR main + sub adapters on every linear layer of every block.

    An entry adapts the backbone's linear layers whose path (``blocks_3/attn/qkv``, as the
    backbone declares them) matches ``layers`` (``re.search``; "" = all) inside ``blocks``
    (``[first, stop)``, ``None`` = to the last); ``init`` names the initialisation, ``ranks``
    its adapters, ``alpha / sum(ranks)`` their shared scale; ``groups`` says which optimizer
    group trains each adapter and ``bias`` where the adapted layers' biases go.
    """
    return (
        dict(
            layers="",
            init="recyclelora",
            ranks=dict(main=main, sub=sub),
            alpha=alpha,
            blocks=(0, None),
            groups=dict(main="main", sub="sub"),
            bias=FROZEN,
        ),
    )


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
    """GTAV -> Cityscapes/BDD100K/Mapillary, RecycleLoRA 32 + 4 (RECIPE.md §3-§6)."""
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
        interpolate_offset=None,  # None: the checkpoint's own rule (convert.load_dinov2)
        # LayerScale's start value in a random backbone (weights=""); DINOv2's 1e-5. A weights file
        # brings its own trained values.
        layerscale_init=1e-5,
        remat=False,
        scan_layers=False,  # identical blocks as one lax.scan: compiled once, same parameters
        dtype="float32",  # compute dtype ("bfloat16" for mixed precision)
        param_dtype="float32",  # storage of the frozen weights ("bfloat16" halves memory)
        attention="auto",  # reference, xla, cudnn or pallas; auto picks by backend
        input_norm="dataset",  # "image": standardise each image's channels (the demo's stand-in)
    )
    c.model.head = dict(
        name="mask2former",
        num_classes=NUM_CLASSES,
        num_queries=100,
        dim=256,
        encoder_layers=6,
        decoder_layers=9,
        sampling="auto",  # bilinear point sampling, head and loss: gather, matmul; auto by backend
        remat=False,  # recompute the deformable sampling in the backward
        remat_layers=False,  # recompute every encoder/decoder layer in the backward
        scan_layers=False,  # encoder layers, decoder rounds as lax.scans: compiled once
    )

    # The recipe: which layers get which adapters, then how every parameter trains (regex over
    # "/"-joined paths of {"backbone": ..., "head": ...}; first match wins; every leaf must match).
    c.method = "recyclelora"
    c.adapters = recyclelora_adapters()
    c.params = (*FROZEN_BACKBONE, *HEAD_PARAMS)
    c.groups = dict(
        main=dict(lr_mult=1.0, weight_decay=False),
        sub=dict(lr_mult=0.5, weight_decay=False),
        # trainable non-adapter backbone leaves (SoMA's biases, full fine-tuning)
        backbone=dict(lr_mult=0.5, weight_decay=True),
        backbone_no_decay=dict(lr_mult=0.5, weight_decay=False),
        head=dict(lr_mult=1.0, weight_decay=True),
        head_no_decay=dict(lr_mult=1.0, weight_decay=False),
    )
    c.init_cache = True  # reuse the initialised adapters from the workdir on restart

    c.optim = dict(
        lr=1e-4,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.05,  # groups with weight_decay=False start at 0
        weight_decay_min=1e-5,  # cosine-annealed per step (mmengine semantics)
        power=0.9,  # polynomial LR decay to 0
        warmup_steps=0,
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
        allow_other_base=False,  # resume over a frozen base other than the checkpoint's
    )

    c.data = dict(
        data_dir="data/tfds",
        # SourceEntry dicts: builder, split, random subset size (0 = all), own data_dir
        sources=(dict(builder="dg_gtav", split="train", subset=12_403),),
        crop_size=512,
        # g2cbm/c2bm pad each crop to 512 in raw pixel space before the flip and the
        # photometric distortion; the multi-source configs have no Pad step (False).
        pad_raw=True,
        workers=4,
        synthetic=None,  # synthetic data to write and prepare first (`prepare_synthetic_once`)
    )

    c.eval = dict(
        # EvalEntry dicts: display name, builder, split, data_dir, resize profile
        datasets=(
            dict(builder="dg_cityscapes"),
            dict(builder="dg_bdd100k"),
            dict(builder="dg_mapillary"),
        ),
        split="validation",
        mode="slide",
        crop_size=512,
        stride=341,
        max_images=0,  # 0 = all
    )

    c.mesh = dict(data=-1, fsdp=1)
    return c


def _rrqr_variant(init: str, keep: tuple[str, ...]) -> Callable[[dict], dict]:
    """Same RRQR adapters with another init (``swapped``) or only some of them (ablations)."""

    def rewrite(entry: dict) -> dict:
        ranks = {n: r for n, r in entry["ranks"].items() if n in keep}
        return dict(entry, init=init, ranks=ranks, groups={n: entry["groups"][n] for n in ranks})

    return rewrite


def _single_adapter(init: str) -> Callable[[dict], dict]:
    """One adapter of RecycleLoRA's total rank, scale ``alpha / r``: same budget, same alpha."""

    def rewrite(entry: dict) -> dict:
        rank = sum(entry["ranks"].values())
        return dict(entry, init=init, ranks=dict(lora=rank), groups=dict(lora="main"))

    return rewrite


def _soma(entry: dict) -> dict:
    """SoMA: minor SVD directions, rank 16, alpha 16, blocks 8 on, adapted biases train."""
    return dict(
        entry,
        init="soma",
        ranks=dict(lora=16),
        alpha=16.0,
        blocks=(8, None),
        groups=dict(lora="backbone"),
        bias="backbone",
    )


# Every method is a rewrite of the RecycleLoRA recipe: of each adapter entry (None: no adapters),
# and of the parameter table (None: unchanged).
METHODS: dict[str, tuple[Callable[[dict], dict] | None, tuple | None]] = {
    "recyclelora": (lambda entry: entry, None),
    "main-only": (_rrqr_variant("main-only", ("main",)), None),
    "sub-only": (_rrqr_variant("sub-only", ("sub",)), None),
    "swapped": (_rrqr_variant("swapped", ("main", "sub")), None),
    "soma": (_soma, None),
    "pissa": (_single_adapter("pissa"), None),
    "milora": (_single_adapter("milora"), None),
    "lora": (_single_adapter("lora"), None),
    "full": (
        None,
        ((r"^backbone/.*norm", "backbone_no_decay"), (r"^backbone/", "backbone"), *HEAD_PARAMS),
    ),
    "frozen": (None, None),
}


def apply_method(c: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
    """Rewrite the RecycleLoRA recipe of ``c`` into ``method``'s (adapters, parameter rules and
    the optimizer settings the method brings)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} unknown; known: {', '.join(METHODS)}")
    if c.method != "recyclelora":
        raise ValueError(f"method={method!r} rewrites the recyclelora recipe, not {c.method!r}")
    adapters, params = METHODS[method]
    c.method = method
    c.adapters = tuple(adapters(dict(e)) for e in c.adapters) if adapters else ()
    if params is not None:
        c.params = params
    if method == "soma":
        c.optim.update(ema_momentum=2e-4, ema_start=12_000)
    elif method == "full":
        # Backbone lr x0.1, the usual mmseg Mask2Former setting (the paper leaves it open).
        for name in ("backbone", "backbone_no_decay"):
            c.groups[name].lr_mult = 0.1
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
        arch="tiny",
        weights="",
        patch_size=8,
        pos_grid=8,
        out_indices=(0, 1, 2, 3),
        # Random weights: LayerScale 1 lets every block (and every adapter) change the output;
        # DINOv2's 1e-5 would leave a random backbone almost the identity, adapters inert.
        layerscale_init=1.0,
    )
    if c.model.head.name == "mask2former":
        c.model.head.update(TINY_MASK2FORMER, loss=dict(num_points=256))
    # Ranks at most 4 (sub 2); SoMA's 8 frozen blocks of 24 become 1 of the tiny backbone's 4.
    c.adapters = tuple(
        dict(
            e,
            ranks={n: min(r, 2 if n == "sub" else 4) for n, r in e["ranks"].items()},
            blocks=(min(e["blocks"][0], 1), e["blocks"][1]),
        )
        for e in c.adapters
    )
    c.train.update(steps=6, batch_size=2, log_every=1, checkpoint_every=3, eval_every=6)
    data = "runs/synthetic/tfds"
    c.data.update(
        data_dir=data,
        sources=(dict(builder="dg_gtav", split="train", data_dir=f"{data}/gtav"),),
        crop_size=64,
        workers=0,
        # Written and prepared by the first smoke run, as the demo does: runs from a fresh clone.
        synthetic=dict(
            root="runs/synthetic/raw",
            data_dir=data,
            styles=("photo",),
            num_train=16,
            num_val=4,
            size=(96, 48),
            seed=0,
        ),
    )
    # Native size: the Cityscapes profile would blow the 96x48 scenes up to 2048x1024.
    photo = dict(
        name="photo",
        builder="dg_cityscapes",
        split="validation",
        data_dir=f"{data}/cityscapes_photo",
        profile="native",
    )
    c.eval.update(datasets=(photo,), mode="whole", crop_size=64, stride=43, max_images=4)
    return c
