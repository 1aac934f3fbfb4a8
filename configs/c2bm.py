"""Cityscapes -> BDD100K / Mapillary, RecycleLoRA r_main 32 + r_sub 2 (RECIPE.md §2, §7).

Arguments as ``configs/g2cbm.py`` (``method=``, ``smoke``, ``seed=``).
"""

from recyclelora_jax.config import apply_common_args, base_config, parse_arg, recyclelora_adapters


def get_config(arg=None):
    c = base_config()
    c.name = "c2bm"
    c.adapters = recyclelora_adapters(sub=2)
    c.data.sources = (dict(builder="dg_cityscapes", split="train"),)
    c.eval.datasets = (dict(builder="dg_bdd100k"), dict(builder="dg_mapillary"))
    return apply_common_args(c, parse_arg(arg))
