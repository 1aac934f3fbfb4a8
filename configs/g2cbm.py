"""GTAV -> Cityscapes / BDD100K / Mapillary, RecycleLoRA r_main 32 + r_sub 4 (RECIPE.md §3-§7).

Arguments: ``method=`` one of recyclelora (default), main-only, sub-only, swapped, soma, pissa,
milora, lora, full, frozen; ``smoke`` for a laptop-sized run; ``seed=N``.
Example: ``python train.py --config configs/g2cbm.py:method=soma --workdir runs/g2cbm_soma``.
"""

from recyclelora_jax.config import apply_common_args, base_config, parse_arg


def get_config(arg=None):
    return apply_common_args(base_config(), parse_arg(arg))
