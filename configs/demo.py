"""The default of ``python train.py``: a PEFT comparison at toy scale on synthetic domain shift.

A small DINOv2-architecture ViT (pretrained here by dense cross-view contrast, or your
converted DINOv2 via --config.model.backbone.weights) is frozen and adapted on the game-rendered
"synthetic" style (GTAV layout) by each of ``demo.methods`` over ``demo.seeds``, then evaluated on
held-out synthetic images and on the unseen "photo" and "dusk" styles (Cityscapes layout).
"""

from recyclelora_jax.config import apply_common_args, base_config, parse_arg, recyclelora_adapters

DATA = "data/synthetic"


def get_config(arg=None):
    """Arguments: ``quick`` (a seconds-long comparison on 16 tiny images, for tests), plus the
    common ``method=``, ``seed=`` (which the comparison sets for each of its runs)."""
    args = parse_arg(arg)
    quick = args.pop("quick", False)
    num_train = 16 if quick else 200
    c = base_config()
    c.name = "demo"
    tfds_dir = f"{DATA}/tfds" + ("_quick" if quick else "")
    c.demo = dict(
        raw_dir=f"{DATA}/raw" + ("_quick" if quick else ""),
        data_dir=tfds_dir,
        num_train=num_train,
        num_val=4 if quick else 50,
        image_size=(96, 48) if quick else (256, 128),  # W x H
        seed=0,
        pretrain_sources=(
            ("gtav", "dg_gtav", f"train[:{num_train}]"),
            ("cityscapes_photo", "dg_cityscapes", "train"),
            ("cityscapes_dusk", "dg_cityscapes", "train"),
        ),
        # Native-scale crops of 128 px: two 112-px views (a 14x14 patch grid, near the runs'
        # 16x16 windows) at independent patch offsets; the loss on every block the head reads.
        # Measured against 64-px views of batch 16 in docs/BENCHMARKS.md, "Demo foundation model".
        pretrain_steps=300,
        pretrain_batch=6,
        pretrain_crop=128,
        pretrain_lr=1e-3,
        pretrain_every_block=True,
        # Three methods, three seeds of 120 steps: 9 min 9 s on a quiet 2-core CPU with the
        # 80-px pretraining before (docs/BENCHMARKS.md, "The demo as a comparison").
        methods=("recyclelora", "lora", "frozen"),
        seeds=(0, 1, 2),
        baseline="lora",
    )
    # The stand-in reads each image (each training crop, each evaluation window) standardised per
    # channel, in its pretraining and in every method's training and evaluation alike: a colour
    # cast of the input, as in the "dusk" style, leaves its features unchanged. Its pretraining
    # starts from LayerScale 1, so that every block learns in its few hundred steps (DINOv2's 1e-5
    # keeps the blocks near the identity). Both measured in docs/BENCHMARKS.md, "Demo foundation
    # model". A converted DINOv2 wants --config.model.backbone.input_norm=dataset.
    c.model.backbone.update(
        arch="tiny",
        patch_size=8,
        pos_grid=8,
        out_indices=(0, 1, 2, 3),
        input_norm="image",
        layerscale_init=1.0,
    )
    # DINOv2's linear probe head: the Mask2Former head costs ~4x per step and ~45 s of compile on
    # this CPU, too much for a demo of nine runs. It stays one flag away:
    # --config.model.head.name=mask2former.
    c.model.head = dict(name="linear", num_classes=19)
    c.adapters = recyclelora_adapters(main=8, sub=2)
    c.optim.update(lr=1e-3)
    # The head starts from scratch and the runs are short: at the adapters' 1e-3 it under-fits
    # even the source (the frozen backbone's held-out synthetic mIoU 14.96 at 200 steps; 16.92 at
    # 120 steps with the head at 1e-2), so every method's head trains at 10x (docs/BENCHMARKS.md).
    for group in ("head", "head_no_decay"):
        c.groups[group].lr_mult = 10.0
    # One checkpoint per run, at its end: a run is a minute, a killed one restarts from step 0.
    c.train.update(steps=120, batch_size=8, log_every=10, checkpoint_every=120, eval_every=120)
    gtav = dict(builder="dg_gtav", data_dir=f"{tfds_dir}/gtav")
    c.data.update(
        data_dir=tfds_dir,
        sources=(dict(gtav, split=f"train[:{num_train}]"),),
        crop_size=128,
        pad_raw=False,  # as when its numbers (README) were measured
        workers=0,
    )
    city = lambda style: dict(
        name=style,
        builder="dg_cityscapes",
        split="validation",
        data_dir=f"{tfds_dir}/cityscapes_{style}",
        profile="native",
    )
    c.eval.update(
        datasets=(
            dict(gtav, name="synthetic", split=f"train[{num_train}:]", profile="native"),
            city("photo"),
            city("dusk"),
        ),
        mode="slide",
        crop_size=128,
        stride=85,
    )
    if quick:
        c.demo.update(
            pretrain_steps=2,
            pretrain_batch=4,
            pretrain_crop=48,
            methods=("recyclelora", "frozen"),
            seeds=(0,),
            baseline="frozen",
        )
        c.train.update(steps=60, batch_size=4, log_every=1, checkpoint_every=60, eval_every=60)
        c.data.crop_size = 32
        c.eval.update(crop_size=32, stride=21)
    return apply_common_args(c, args)
