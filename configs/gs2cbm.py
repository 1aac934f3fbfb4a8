"""GTAV + SYNTHIA -> Cityscapes / BDD100K / Mapillary (multi-source), RecycleLoRA 32 + 4.

The sources are concatenated (GTAV's random 12,403-image subset plus all of SYNTHIA) and
shuffled together. Arguments as ``configs/g2cbm.py``.
"""

from recyclelora_jax.config import apply_common_args, base_config, parse_arg


def get_config(arg=None):
    c = base_config()
    c.data.pad_raw = False  # the multi-source pipelines have no Pad step
    c.name = "gs2cbm"
    c.data.sources = (
        dict(builder="dg_gtav", split="train", subset=12_403),
        dict(builder="dg_synthia", split="train"),
    )
    return apply_common_args(c, parse_arg(arg))
