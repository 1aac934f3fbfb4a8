"""Compile time of the backbone's forward + backward with the blocks unrolled and scanned.

``python benchmarks/scan_compile.py --topology v5p:2x2x1 --depths 4 8``

The preflight's ``backbone`` part (``recyclelora_jax.preflight``) of ``configs/g2cbm.py`` with the
ViT-L/16 width at reduced depths (the ``vitl14`` entry's depth is replaced in this process;
out indices spread as the recipe's), bfloat16 compute and storage, remat, per-chip batch 4,
compiled deviceless for the topology. Unrolled, the compile grows with the depth; scanned, it
should not. Prints one row per (depth, scan) and writes them to ``--json`` when given.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from absl import app, flags

from recyclelora_jax import preflight
from recyclelora_jax.config import base_config
from recyclelora_jax.models.dinov2 import ARCHS, resolve_attention
from recyclelora_jax.train.sharding import make_mesh

_TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology or local.")
_DEPTHS = flags.DEFINE_list("depths", ["4", "8"], "Backbone depths at ViT-L width.")
_BATCH = flags.DEFINE_integer("per_chip_batch", 4, "Images per chip.")
_JSON = flags.DEFINE_string("json", "", "Write the rows here.")


def compile_backbone(depth: int, scan: bool, topology: str, per_chip_batch: int) -> dict:
    ARCHS["vitl14"] = dataclasses.replace(ARCHS["vitl14"], depth=depth)
    devices, chip = preflight.topology(topology)
    cfg = base_config()
    cfg.model.backbone.update(
        attention=resolve_attention("auto", devices[0].platform, "bfloat16"),
        out_indices=tuple(depth * (k + 1) // 4 - 1 for k in range(4)),
        dtype="bfloat16",
        param_dtype="bfloat16",
        remat=True,
        scan_layers=scan,
    )
    mesh = make_mesh(**cfg.mesh, devices=devices)
    fn, args, model = preflight.programs(cfg, mesh, per_chip_batch, True, False)["backbone"]
    r = preflight.compile_program(fn, args, chip, per_chip_batch, model)
    keys = ("compile_seconds", "temp_bytes", "flops", "bytes_accessed", "estimated_step_seconds")
    return dict(depth=depth, scan=scan, **{k: r[k] for k in keys})


def main(argv: list[str]) -> None:
    del argv
    rows = []
    for depth in map(int, _DEPTHS.value):
        for scan in (False, True):
            row = compile_backbone(depth, scan, _TOPOLOGY.value, _BATCH.value)
            print(json.dumps(row), flush=True)
            rows.append(row)
    if _JSON.value:
        Path(_JSON.value).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(app.run(main))
