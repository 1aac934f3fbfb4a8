"""The default of ``python train.py``: RecycleLoRA at toy scale on synthetic domain-shift data.

A small DINOv2-architecture ViT (pretrained here by masked-image modelling, or your converted
DINOv2 via --config.model.backbone.weights) is frozen and adapted on the flat "synthetic" style
(GTAV layout), then evaluated on held-out synthetic images and on the unseen "photo" and "dusk"
styles (Cityscapes layout), beside the frozen-backbone and plain-LoRA baselines.
"""

from recyclelora_jax.config import apply_common_args, base_config, parse_arg

DATA = "data/synthetic"


def get_config(arg=None):
    c = base_config()
    c.name = "demo"
    tfds_dir = f"{DATA}/tfds"
    c.demo = dict(
        raw_dir=f"{DATA}/raw",
        data_dir=tfds_dir,
        num_train=200,
        num_val=50,
        image_size=(256, 128),  # W x H
        seed=0,
        pretrain_sources=(
            ("gtav", "dg_gtav", "train[:200]"),
            ("cityscapes_photo", "dg_cityscapes", "train"),
            ("cityscapes_dusk", "dg_cityscapes", "train"),
        ),
        pretrain_steps=300,
        pretrain_batch=16,
        pretrain_crop=64,
        pretrain_lr=1e-3,
        baselines=("frozen", "lora"),
        png_per_dataset=2,
    )
    c.model.backbone.update(arch="tiny", patch_size=8, pos_grid=8, out_indices=(0, 1, 2, 3))
    c.model.head.update(
        num_queries=20,
        dim=64,
        encoder_layers=2,
        decoder_layers=3,
        encoder_ffn_dim=128,
        decoder_ffn_dim=256,
        loss=dict(num_points=1024),
    )
    c.peft.update(r_main=8, r_sub=2)
    c.optim.update(lr=1e-3)
    c.train.update(steps=300, batch_size=8, log_every=10, checkpoint_every=100, eval_every=300)
    c.data.update(
        data_dir=tfds_dir,
        sources=(("dg_gtav", "train[:200]", 0, f"{tfds_dir}/gtav"),),
        crop_size=128,
        workers=0,
    )
    c.eval.update(
        datasets=(
            ("synthetic", "dg_gtav", "train[200:]", f"{tfds_dir}/gtav", "native"),
            ("photo", "dg_cityscapes", "validation", f"{tfds_dir}/cityscapes_photo", "native"),
            ("dusk", "dg_cityscapes", "validation", f"{tfds_dir}/cityscapes_dusk", "native"),
        ),
        mode="slide",
        crop_size=128,
        stride=85,
    )
    return apply_common_args(c, parse_arg(arg))
