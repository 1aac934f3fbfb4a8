"""The preflight compiles train.py's step for a TPU topology (deviceless, with libtpu) and for
the local devices, and its numbers are the compiler's own; the analytic FLOPs are a hand count."""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from train_helpers import run_cli, write_config_file

from recyclelora_jax import preflight
from recyclelora_jax.config import TINY_MASK2FORMER, base_config, smoke
from recyclelora_jax.models import flops as flops_lib
from recyclelora_jax.models import loops
from recyclelora_jax.models.adapters import AdapterSpec
from recyclelora_jax.models.dinov2 import ARCHS, DinoV2
from recyclelora_jax.models.mask2former import Mask2FormerHead

KEYS = (
    "topology",
    "chips",
    "per_chip_batch",
    "hbm_bytes",
    "hbm_capacity_bytes",
    "fits",
    "flops",
    "model_flops",
    "bytes_accessed",
    "estimated_step_seconds",
    "analytic_step_seconds",
    "compile_seconds",
)


# Frozen leaves the training step never reads (no masked tokens, no final norm before the head):
# jit drops them from the arguments.
UNUSED = ("backbone/mask_token", "backbone/norm/scale", "backbone/norm/bias")


def tiny_config() -> ml_collections.ConfigDict:
    c = smoke(base_config())
    c.model.head = ml_collections.ConfigDict(dict(name="linear", num_classes=19))
    c.data.crop_size = 32
    c.eval.crop_size = 32
    return c


def per_chip_argument_bytes(cfg, mesh, per_chip_batch: int) -> int:
    """What the step's arguments occupy on one chip, from the abstract state and its shardings."""
    _, state, frozen, _ = preflight.abstract_run(cfg, mesh, per_chip_batch)
    arrays = (state["trainable"], state["opt"], frozen)
    total = sum(
        int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
        for path, x in jax.tree_util.tree_flatten_with_path(arrays)[0]
        if jax.tree_util.keystr(path[1:], simple=True, separator="/") not in UNUSED
    )
    crop = cfg.data.crop_size
    return total + per_chip_batch * crop * crop * (3 * 4 + 4) + 4  # f32 image, i32 label, step


def test_tpu_topology_report_is_the_compilers_plan():
    cfg = tiny_config()
    r = preflight.preflight(cfg, "v5e:2x2", per_chip_batch=2, log=lambda _: None)
    assert all(k in r for k in KEYS)
    assert (r["topology"], r["chip"], r["chips"], r["per_chip_batch"]) == ("v5e:2x2", "v5e", 4, 2)
    assert r["hbm_capacity_bytes"] == 16 * 2**30 and r["fits"]
    assert r["hbm_bytes"] == (
        r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"] - r["alias_bytes"]
    )
    # Replicated state and a batch of 2 per chip, in TPU tiles (small leaves are padded).
    mesh = preflight.make_mesh(devices=preflight.topology("v5e:2x2")[0])
    assert 1.0 <= r["argument_bytes"] / per_chip_argument_bytes(cfg, mesh, 2) < 1.1
    assert r["alias_bytes"] > 0  # the trainable state and optimizer state are donated
    f = preflight.model_flops(cfg, preflight.abstract_run(cfg, mesh)[0])
    assert r["model_flops"] == pytest.approx(2 * (f["backbone"] + f["head"] + f["loss"]).train)
    assert 0.9 < r["flops"] / r["model_flops"] < 2.0
    assert r["analytic_step_seconds"] == pytest.approx(r["model_flops"] / 197e12)
    assert r["estimated_step_seconds"] > 0 and 0 < r["mfu"] <= 1
    assert set(r["parts"]) == {"backbone", "head", "loss"} and "eval" in r
    for part in (*r["parts"].values(), r["eval"]):
        assert all(k in part for k in KEYS[3:]) and part["hbm_bytes"] > 0
    # Data parallel: the gradients are summed over the 4 chips.
    assert r["collectives"]["all-reduce"]["count"] >= 1


def test_local_backend_and_fsdp_mesh():
    cfg = tiny_config()
    cfg.mesh.fsdp = 2
    r = preflight.preflight(cfg, "local", 1, parts=False, evaluate=False, log=lambda _: None)
    assert r["chips"] == jax.device_count() and r["mesh"] == {"data": r["chips"] // 2, "fsdp": 2}
    assert r["fits"] and r["hbm_bytes"] > r["argument_bytes"] > 0
    # Without tiling, the argument buffers are exactly the state (FSDP-split leaves count
    # half on each chip) and one image.
    assert r["argument_bytes"] == per_chip_argument_bytes(cfg, preflight.make_mesh(fsdp=2), 1)
    assert r["analytic_step_seconds"] is None  # no published peak for a CPU
    assert "parts" not in r and "eval" not in r
    # FSDP: parameters are gathered before use.
    assert "all-gather" in r["collectives"]


def test_cli_overrides_json_and_exit_status(tmp_path):
    """The CLI on a config file, with an override that reaches the compiled step: its argument
    bytes are those of a 32-px crop, not the file's 64."""
    cfg = tiny_config()
    cfg.data.crop_size = 64
    out = tmp_path / "r.json"
    cmd = [
        sys.executable,
        "-m",
        "recyclelora_jax.preflight",
        f"--config={write_config_file(tmp_path / 'cfg.py', cfg)}",
        "--config.data.crop_size=32",
        "--topology",
        "local",
        "--per-chip-batch",
        "1",
        "--noparts",
        "--noeval",
        "--json",
        str(out),
    ]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    done = run_cli(cmd, env=env)
    assert done.returncode == 0, done.stderr
    r = json.loads(out.read_text())
    assert (r["chips"], r["per_chip_batch"]) == (2, 1) and all(k in r for k in KEYS)
    assert "train |" in done.stdout
    cfg.data.crop_size = 32
    mesh = preflight.make_mesh(devices=jax.devices()[:2])
    assert r["argument_bytes"] == per_chip_argument_bytes(cfg, mesh, 1)
    with pytest.raises(SystemExit, match="GiB per chip"):
        preflight.exit_unless_fits({**r, "fits": False, "hbm_capacity_bytes": 1})


def test_backbone_flops_hand_count():
    arch = ARCHS["tiny"]  # width 128, MLP 512, 4 blocks, 8-px patches
    layout = (("blocks_0/attn/qkv", AdapterSpec((("main", 3), ("sub", 1)), 1.0)),)
    f = flops_lib.backbone_flops(arch, (16, 16), (1,), layout)
    # 16x16 image, patch 8: 4 patches + CLS = 5 tokens of width 128, MLP 512.
    kernels = 2 * 5 * 128 * (384 + 128 + 512) + 2 * 5 * 512 * 128  # qkv, proj, fc1; fc2
    attention = 2 * (2 * 5 * 5 * 128)  # q k^T and weights @ v
    adapter = 2 * 5 * 128 * 4 + 2 * 5 * 4 * 384  # rank 3 + 1 on blocks_0 qkv
    patch = 2 * 4 * (8 * 8 * 3) * 128
    # Blocks 0 and 1 run; 2 and 3, after the last out index, are not counted.
    assert f.forward == patch + 2 * (kernels + attention) + adapter
    every = flops_lib.backbone_flops(arch, (16, 16), (3,), layout)
    assert every.forward == patch + 4 * (kernels + attention) + adapter
    # Frozen kernels: input gradients only (none for the patch embedding); attention and the
    # adapters need both operand gradients.
    assert f.backward == 2 * (kernels + 2 * attention) + 2 * adapter
    full = flops_lib.backbone_flops(arch, (16, 16), (1,), mode="full")
    assert full.backward == patch + 2 * (2 * kernels + 2 * attention)
    assert flops_lib.backbone_flops(arch, (16, 16), (0,), mode="frozen").backward == 0


def _xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def test_analytic_forward_flops_match_xla():
    arch = ARCHS["tiny"]
    backbone = DinoV2(arch, out_indices=(0, 1, 2, 3))
    images = jnp.zeros((1, 64, 64, 3))
    bp = backbone.init(jax.random.key(0), images)
    fwd = lambda p, x: backbone.apply(p, x)["features"]
    analytic = flops_lib.backbone_flops(arch, (64, 64), (0, 1, 2, 3)).forward
    assert _xla_flops(fwd, bp, images) == pytest.approx(analytic, rel=0.1)
    # The tiny head at width 64: at its own 32, the elementwise work XLA also counts is 23 % of
    # the products (measured); at 64, 8 %.
    head_cfg = dict(
        TINY_MASK2FORMER, num_classes=19, dim=64, encoder_ffn_dim=64, decoder_ffn_dim=64
    )
    head = Mask2FormerHead(**head_cfg)
    feats = [jnp.zeros((1, 8, 8, arch.embed_dim))] * 4
    hp = head.init(jax.random.key(0), feats)
    analytic = flops_lib.mask2former_flops(head_cfg, arch.embed_dim, (8, 8)).forward
    assert _xla_flops(lambda p, f: head.apply(p, f), hp, feats) == pytest.approx(analytic, rel=0.15)
    assert np.isfinite(analytic)


def test_unrolled_costs_count_every_scanned_layer():
    """``cost_analysis()`` counts a scanned backbone's body once; with ``unrolled_costs`` the
    scanned step and backbone cost what the unscanned ones cost, while memory and compile
    time stay those of the scanned program train.py runs."""

    def run(scan: bool, unrolled: bool) -> dict:
        cfg = tiny_config()
        cfg.model.backbone.scan_layers = scan
        return preflight.preflight(
            cfg, "local", 1, evaluate=False, log=lambda _: None, unrolled_costs=unrolled
        )

    counted, exact, plain = run(True, False), run(True, True), run(False, False)
    assert (counted["costs"], exact["costs"]) == ("counted", "unrolled")
    for c, e, p in (
        (counted, exact, plain),
        *((counted["parts"][k], exact["parts"][k], plain["parts"][k]) for k in ("backbone",)),
    ):
        assert c["while_loops"] > 0 and p["while_loops"] == e["unrolled_while_loops"] == 0
        assert e["temp_bytes"] == c["temp_bytes"] and e["while_loops"] == c["while_loops"]
        assert e["flops"] > 2 * c["flops"]
        # Scanning changes the program, not the computation counted with every trip; the
        # unrolled scan still reads the stacked copy of the layers' parameters.
        assert e["flops"] == pytest.approx(p["flops"], rel=0.01)
        assert e["bytes_accessed"] == pytest.approx(p["bytes_accessed"], rel=0.1)
    marked = lambda r: preflight.format_report(r).split("\n")[2].count("*")  # the step's row
    assert (marked(counted), marked(exact), marked(plain)) == (3, 0, 0)
    assert "loops (counted)" in preflight.format_report(counted)


def test_unrolled_loss_counts_every_prediction_set():
    """The set loss runs its sets in a loop: unrolled, its FLOPs are about the number of sets
    times what the counted program shows for one set's terms."""
    cfg = smoke(base_config())
    cfg.data.crop_size = 32
    cfg.model.head.decoder_layers = 3  # 4 prediction sets
    mesh = preflight.make_mesh(devices=jax.devices()[:1])
    chip = preflight.topology("local")[1]

    def loss_costs() -> dict:
        fn, args, model = preflight.programs(cfg, mesh, 1, parts=True, evaluate=False)["loss"]
        return preflight.compile_program(fn, args, chip, 1, model)

    counted = loss_costs()
    with loops.unrolled():
        exact = loss_costs()
    assert 2.5 < exact["flops"] / counted["flops"] < 4.5
    assert exact["bytes_accessed"] > 1.5 * counted["bytes_accessed"]
