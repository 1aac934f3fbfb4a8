"""Per-chip memory of the Mask2Former transformer decoder's forward + backward, unrolled or
with its rounds scanned, compiled deviceless for a TPU topology.

``python benchmarks/decoder_compile.py --topology v5p:2x2x1 --layers 6 --remat_layers``

The recipe's decoder shapes (levels 16², 32², 64² and 128² mask features of 256 channels for a
512-px crop, 100 queries, 19 classes, bfloat16 compute, float32 parameters), per-chip batch 4
split over the topology's chips. Its two outputs are consumed by a ``lax.map`` over the
prediction sets, as the set loss consumes them, and the gradients to the parameters and the
inputs are the program: a minute's compile where the whole step takes several (with
``XLA_FLAGS=--xla_dump_to=DIR`` XLA writes its buffer reports, ``*memory-usage-report.txt``).
Prints one JSON row per layout. It does not reproduce the whole step's buffers: a change that
saved 0.12 GiB here cost 1.7 GiB in the step (``docs/BENCHMARKS.md``).
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
from absl import app, flags

from recyclelora_jax import preflight
from recyclelora_jax.models.mask2former import TransformerDecoder
from recyclelora_jax.train.sharding import BATCH_AXES, make_mesh, replicated

_TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology or local.")
_LAYERS = flags.DEFINE_integer("layers", 6, "Decoder layers (a multiple of 3 scans them all).")
_BATCH = flags.DEFINE_integer("per_chip_batch", 4, "Images per chip.")
_REMAT = flags.DEFINE_bool("remat_layers", True, "Recompute each decoder layer.")
_LAYOUTS = flags.DEFINE_list("layouts", ["unrolled", "scanned"], "unrolled and/or scanned.")

NamedSharding, P = jax.sharding.NamedSharding, jax.sharding.PartitionSpec
CROP, DIM, QUERIES, CLASSES = 512, 256, 100, 19


def decoder_program(mesh: jax.sharding.Mesh, per_chip_batch: int, layers: int, **kw) -> tuple:
    """(jitted gradient function, abstract arguments) of the decoder under a set-wise loss."""
    n = per_chip_batch * mesh.size
    batched = lambda *s: jax.ShapeDtypeStruct(
        s, jnp.bfloat16, sharding=NamedSharding(mesh, P(BATCH_AXES))
    )
    levels = [batched(n, CROP // s, CROP // s, DIM) for s in (32, 16, 8)]
    mask_features = batched(n, CROP // 4, CROP // 4, DIM)
    model = TransformerDecoder(CLASSES, num_layers=layers, num_queries=QUERIES, **kw)
    shapes = jax.eval_shape(model.init, jax.random.key(0), levels, mask_features)["params"]
    params = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated(mesh)), shapes
    )

    def loss(p, levels, mask_features):
        logits, masks = model.apply({"params": p}, levels, mask_features)
        per_set = lambda a: (
            (a[0].astype(jnp.float32) ** 2).mean() + (a[1].astype(jnp.float32) ** 2).mean()
        )
        return jax.lax.map(per_set, (logits, masks)).sum()

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (params, levels, mask_features)


def compile_decoder(layout: str) -> dict:
    devices, chip = preflight.topology(_TOPOLOGY.value)
    mesh = make_mesh(devices=devices)
    fn, args = decoder_program(
        mesh,
        _BATCH.value,
        _LAYERS.value,
        remat_layers=_REMAT.value,
        scan_layers=layout == "scanned",
    )
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        r = preflight.compile_program(fn, args, chip, _BATCH.value, preflight.flops_lib.Flops())
    keys = ("compile_seconds", "temp_bytes", "argument_bytes", "output_bytes", "bytes_accessed")
    row = dict(layout=layout, layers=_LAYERS.value, remat_layers=_REMAT.value)
    return row | {k: r[k] for k in keys} | {"temp_gib": r["temp_bytes"] / 2**30}


def main(argv: list[str]) -> None:
    del argv
    for layout in _LAYOUTS.value:
        print(json.dumps(compile_decoder(layout)), flush=True)


if __name__ == "__main__":
    sys.exit(app.run(main))
