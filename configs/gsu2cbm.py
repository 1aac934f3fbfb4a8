"""GTAV + SYNTHIA + UrbanSyn -> Cityscapes / BDD100K / Mapillary, RecycleLoRA 32 + 4.

UrbanSyn is read by ``dg_urbansyn`` from its download layout (``rgb/``, ``ss/``). Arguments as
``configs/g2cbm.py``.
"""

from recyclelora_jax.config import apply_common_args, base_config, parse_arg


def get_config(arg=None):
    c = base_config()
    c.data.pad_raw = False  # the multi-source pipelines have no Pad step
    c.name = "gsu2cbm"
    c.data.sources = (
        dict(builder="dg_gtav", split="train", subset=12_403),
        dict(builder="dg_synthia", split="train"),
        dict(builder="dg_urbansyn", split="train"),
    )
    return apply_common_args(c, parse_arg(arg))
