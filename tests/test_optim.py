"""Parameter groups and the RECIPE.md §5 optimizer against torch's AdamW and LR schedulers."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
from flax import traverse_util

from recyclelora_jax import build, recipe
from recyclelora_jax.config import (
    FROZEN,
    apply_method,
    base_config,
    recyclelora_adapters,
    smoke,
)
from recyclelora_jax.models.dinov2 import ARCHS, DinoV2
from recyclelora_jax.peft.params import attach, attach_shapes
from recyclelora_jax.recipe import ParamGroup, label_params, merge_trees, split_trainable
from recyclelora_jax.train import trainer
from recyclelora_jax.train.optim import (
    OptimConfig,
    cosine_wd,
    ema_update,
    group_transform,
    make_optimizer,
    optim_config,
    param_overview,
    poly_lr,
)
from recyclelora_jax.train.sharding import make_mesh

STEPS = (0, 1, 20_000, 39_999, 40_000)
TINY, OUT = ARCHS["tiny"], (1, 3)


def _step_config():
    """The smoke config with the linear head and RecycleLoRA 8 + 2 on 2 crops of 32 px, 10
    steps, one device: what the step tests run through ``train.trainer``. Adam's eps is 1e-4:
    the reference optimizers get their gradients from another compiled program than the step's,
    and where |g| is near eps, ``g / (|g| + eps)`` amplifies last-bit gradient differences by
    up to 1/eps (the formulas compared hold for any eps)."""
    c = smoke(base_config())
    c.model.head = ml_collections.ConfigDict(dict(name="linear", num_classes=19))
    c.adapters = recyclelora_adapters(main=8, sub=2)
    c.data.crop_size = 32
    c.train.update(steps=10, batch_size=2)
    c.optim.eps = 1e-4
    c.mesh.update(data=1, fsdp=1)
    return c


CFG = _step_config()


def _plan(method: str = "recyclelora") -> recipe.Recipe:
    """The config's recipe on the tiny backbone: RecycleLoRA 8 + 2, or ``method`` at smoke size
    (SoMA then adapts blocks 1-3)."""
    c = CFG if method == "recyclelora" else smoke(apply_method(base_config(), method))
    return recipe.from_config(c, TINY)


PLAN = _plan()


def _flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


def test_schedules_equal_torch_recursions_and_closed_forms():
    """torch's PolynomialLR / CosineAnnealingLR are the recursive forms mmengine's PolyLR and
    CosineAnnealingParamScheduler implement; drive them 40k steps and compare."""
    cfg = OptimConfig()
    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([{"params": [param], "lr": 1e-4}], lr=1e-4)
    wd_opts = [torch.optim.SGD([param], lr=start) for start in (0.05, 0.0)]
    scheds = [torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=40_000, power=0.9)]
    scheds += [
        torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=40_000, eta_min=1e-5) for o in wd_opts
    ]
    seen = {}
    for step in range(40_001):
        if step in STEPS:
            seen[step] = [opt.param_groups[0]["lr"]] + [o.param_groups[0]["lr"] for o in wd_opts]
        for o in (opt, *wd_opts):
            o.step()
        for s in scheds:
            s.step()
    lr, wd_on, wd_off = poly_lr(cfg), cosine_wd(cfg, 0.05), cosine_wd(cfg, 0.0)
    for step in STEPS:
        closed = [
            1e-4 * (1 - step / 40_000) ** 0.9,
            *(1e-5 + (w0 - 1e-5) * (1 + math.cos(math.pi * step / 40_000)) / 2 for w0 in (0.05, 0)),
        ]
        ours = [float(f(step)) for f in (lr, wd_on, wd_off)]
        np.testing.assert_allclose(seen[step], closed, rtol=1e-9, atol=1e-15)  # recursion
        np.testing.assert_allclose(ours, closed, rtol=2e-6, atol=1e-13)  # float32 schedules
    assert float(wd_off(1)) > 0  # a group starting at 0 rises from the first step
    assert float(lr(50_000)) == 0.0 and float(wd_on(50_000)) == pytest.approx(1e-5)


def test_linear_warmup_then_poly():
    lr = poly_lr(OptimConfig(total_steps=100, warmup_steps=10), mult=0.5)
    np.testing.assert_allclose(
        [float(lr(t)) for t in (0, 5, 10, 55, 100)],
        [0.0, 2.5e-5, 5e-5, 5e-5 * 0.5**0.9, 0.0],
        rtol=1e-6,
    )


@pytest.fixture(scope="module")
def full_tree(tiny_backbone):
    backbone, images = tiny_backbone
    backbone, layout = attach(backbone, TINY, PLAN.attach, progress=False)
    rng = np.random.default_rng(0)
    head = {
        "proj": {"kernel": rng.standard_normal((64, 8)), "bias": np.zeros(8)},
        "transformer_decoder": {
            "query_embed": rng.standard_normal((4, 8)),
            "query_feat": rng.standard_normal((4, 8)),
        },
        "out_norm": {"scale": np.ones(8), "bias": np.zeros(8)},
    }
    head = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), head)
    return {"backbone": backbone, "head": head}, layout, images


def test_labels_first_match_and_errors(full_tree):
    params, _, _ = full_tree
    labels = _flat(label_params(params, PLAN.labels, PLAN.groups))
    assert labels["backbone/blocks_3/attn/qkv/adapter_main/a"] == "main"
    assert labels["backbone/blocks_0/mlp/fc2/adapter_sub/b"] == "sub"
    assert labels["backbone/blocks_0/mlp/fc2/kernel"] == FROZEN
    assert labels["backbone/blocks_0/norm1/scale"] == FROZEN  # frozen wins over "norm"
    assert labels["head/transformer_decoder/query_embed"] == "head_no_decay"
    assert labels["head/transformer_decoder/query_feat"] == "head"
    assert labels["head/out_norm/scale"] == "head_no_decay"
    assert labels["head/proj/kernel"] == "head"
    with pytest.raises(ValueError, match=r"2 parameters match no label rule: \['head/proj/"):
        label_params(params, [(r"^backbone/", FROZEN), (r"query|norm", "head")])
    with pytest.raises(ValueError, match=r"undefined groups \['mian'\]"):
        label_params(params, [("adapter_main", "mian"), (".", FROZEN)], PLAN.groups)
    head = params["head"]
    for method in ("soma", "full"):
        plan = _plan(method)
        shapes = {"backbone": attach_shapes(TINY, plan.attach)[0], "head": head}
        labels = _flat(label_params(shapes, plan.labels, plan.groups))
        if method == "soma":
            assert labels["backbone/blocks_2/attn/qkv/bias"] == "backbone"
            assert labels["backbone/blocks_0/attn/qkv/bias"] == FROZEN
            assert labels["backbone/blocks_3/mlp/fc1/adapter_lora/a"] == "backbone"
            assert labels["backbone/blocks_3/mlp/fc1/kernel"] == FROZEN
        else:
            assert labels["backbone/blocks_3/mlp/fc1/kernel"] == "backbone"
            assert labels["backbone/norm/scale"] == "backbone_no_decay"
    with pytest.raises(ValueError, match="trees overlap at"):
        merge_trees(params, params)


def _adamw_first_step(p, g, lr, wd):
    """Hand-computed torch AdamW at t=1: m̂ = g, v̂ = g², p ← p(1 - lr·wd) - lr·g/(|g| + eps)."""
    return p * (1 - lr * wd) - lr * g / (np.abs(g) + CFG.optim.eps)


@pytest.fixture(scope="module")
def step_setup(full_tree):
    """``train.trainer``'s setup, abstract state and frozen base for the tiny backbone, and
    the starting full tree (its adapters, the linear head's init)."""
    backbone_params, layout, images = full_tree
    backbone = DinoV2(TINY, out_indices=OUT, layerscale_init=1.0)
    setup, abstract, abstract_frozen, batch = trainer.abstract_train_state(
        CFG, make_mesh(**CFG.mesh), backbone
    )
    assert setup.model.backbone.adapters == layout
    head = build.init_head(setup.model, CFG.data.crop_size, CFG.seed)
    params = {"backbone": backbone_params["backbone"], "head": head}
    labels = np.random.default_rng(0).integers(0, 19, images.shape[:3])
    labels[:, :4] = 255  # some ignored pixels
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels, jnp.int32)}
    return setup, abstract, abstract_frozen, params, batch


def test_three_steps_frozen_untouched_groups_use_their_lr(step_setup):
    """Three steps of the jitted step train.py runs against torch's AdamW with mmengine's
    per-iteration weight-decay annealing, fed the gradients of the same loss."""
    setup, abstract, abstract_frozen, params, batch = step_setup
    trainable, frozen = split_trainable(params, setup.labels)
    trainable_labels, _ = split_trainable(setup.labels, setup.labels)
    place = lambda tree, like: jax.device_put(tree, jax.tree.map(lambda x: x.sharding, like))
    state = place(
        {
            "trainable": trainable,
            "opt": setup.tx.init(trainable),
            "ema": None,
            "step": jnp.int32(0),
        },
        abstract,
    )
    frozen = place(frozen, abstract_frozen)
    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    n_frozen = sum(x.size for x in jax.tree.leaves(frozen))
    state_floats = sum(x.size for x in jax.tree.leaves(state["opt"]) if x.dtype == jnp.float32)
    assert n_frozen > n_trainable and state_floats == 2 * n_trainable  # mu, nu: trainable only

    loss_fn = trainer.make_loss_fn(setup)
    grad_fn = jax.jit(jax.grad(lambda *a: loss_fn(*a)[0]))
    step = trainer.make_train_step(setup, abstract, abstract_frozen)
    torch_opt, torch_params = _torch_adamw(trainable, trainable_labels)
    torch_sched = torch.optim.lr_scheduler.PolynomialLR(torch_opt, total_iters=10, power=0.9)
    start = _flat(jax.device_get(trainable))
    key = jax.random.key(CFG.seed)
    for t in range(3):
        rng = jax.random.fold_in(key, t)
        before = _flat(jax.device_get(state["trainable"]))  # the step donates its state
        grads = grad_fn(state["trainable"], frozen, batch["image"], batch["label"], rng)
        grads = _flat(jax.device_get(grads))
        assert grads.keys() == start.keys()  # no gradient exists for frozen leaves
        for group in torch_opt.param_groups:  # mmengine: anneal wd per iteration
            w0 = group["initial_wd"]
            group["weight_decay"] = 1e-5 + (w0 - 1e-5) * (1 + math.cos(math.pi * t / 10)) / 2
            group["params"][0].grad = torch.tensor(np.asarray(grads[group["key"]]))
        torch_opt.step()
        torch_sched.step()
        state, metrics = step(state, frozen, batch)
        assert int(state["step"]) == t + 1 and np.isfinite(float(metrics["loss"]))
        after = _flat(jax.device_get(state["trainable"]))
        if t == 0:  # hand-computed first step: main at lr 1e-4, sub at 5e-5, both wd 0
            for name, lr in (("main", 1e-4), ("sub", 5e-5)):
                key_ = f"backbone/blocks_1/attn/qkv/adapter_{name}/b"
                p0, g = (np.asarray(x[key_], np.float64) for x in (before, grads))
                want = _adamw_first_step(p0, g, lr, 0.0)
                # one float32 rounding of p + update, and the update within 1e-5 of itself
                # (optax's float32 bias correction 1 - b2^t; see _assert_same_update)
                tol = np.spacing(np.abs(after[key_])) + lr * 1e-5
                assert (np.abs(after[key_] - want) <= tol).all(), key_
        for name, value in after.items():
            _assert_same_update(value, torch_params[name].numpy(), start[name])
    merged = _flat(jax.device_get(merge_trees(state["trainable"], frozen)))
    for name, value in _flat(split_trainable(params, setup.labels)[1]).items():
        np.testing.assert_array_equal(merged[name], value)  # bit-identical
    for name in (k for k in start if "adapter_" in k):
        assert not np.array_equal(merged[name], start[name]), name


def _assert_same_update(ours, theirs, start):
    """optax forms Adam's bias correction ``1 - b2^t`` in float32, torch in float64: each step
    differs by ~6e-6 of its size (<= lr = 1e-4). Allow 2e-5 of three such steps plus 4 float32
    ulps of the parameter values."""
    start = np.asarray(start)
    tol = 2e-5 * 3e-4 + 4 * np.spacing(np.abs(start))
    bad = np.abs(ours - theirs) > tol
    assert not bad.any(), (ours[bad][:3], theirs[bad][:3], start[bad][:3])


def _torch_adamw(trainable, labels):
    """torch AdamW with one param group per leaf, lr and initial wd from the leaf's group."""
    groups = {g.name: g for g in PLAN.groups}
    flat_labels = _flat(labels)
    tensors = {k: torch.tensor(np.asarray(v)) for k, v in _flat(trainable).items()}
    param_groups = []
    for key, tensor in tensors.items():
        group = groups[flat_labels[key]]
        wd = 0.05 if group.weight_decay else 0.0
        param_groups.append(
            {"params": [tensor], "lr": 1e-4 * group.lr_mult, "initial_wd": wd, "key": key}
        )
    return torch.optim.AdamW(param_groups, betas=(0.9, 0.999), eps=CFG.optim.eps), tensors


def test_trainable_only_step_needs_less_memory(step_setup):
    """The step train.py runs against the wasteful baseline on the same loss: differentiate
    every leaf and freeze by an lr-0 AdamW group (parameters and optimizer state donated)."""
    setup, abstract, abstract_frozen, _, batch = step_setup
    ours = trainer.make_train_step(setup, abstract, abstract_frozen)
    ours = ours.lower(abstract, abstract_frozen, batch).compile()
    cfg = optim_config(CFG)
    transforms = {g.name: group_transform(cfg, g) for g in PLAN.groups}
    zero_lr = group_transform(cfg, ParamGroup(FROZEN, 0.0, False))
    naive_opt = optax.partition({**transforms, FROZEN: zero_lr}, setup.labels)
    loss_fn = trainer.make_loss_fn(setup)

    def naive(params, opt_state, images, labels):
        grads = jax.grad(lambda p: loss_fn(p, {}, images, labels, jax.random.key(0))[0])(params)
        updates, opt_state = naive_opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params = merge_trees(abstract["trainable"], abstract_frozen)
    full = jax.jit(naive, donate_argnums=(0, 1))
    full = full.lower(params, jax.eval_shape(naive_opt.init, params), *batch.values()).compile()

    def total(compiled):
        m = compiled.memory_analysis()
        return (
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            + m.temp_size_in_bytes
            - m.alias_size_in_bytes
        )

    # The saving is the frozen leaves' Adam moments (2x their bytes) less a little scheduling
    # slack; XLA fuses their gradients into the update instead of materialising them.
    frozen_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_frozen))
    assert total(full) - total(ours) >= 1.5 * frozen_bytes
    assert ours.cost_analysis()["flops"] < full.cost_analysis()["flops"]  # no frozen weight grads


def test_ema_follows_mmengine_begin_iter():
    ema, params = {"w": jnp.array([0.0, 2.0])}, {"w": jnp.array([1.0, 4.0])}
    before = ema_update(ema, params, step=5, momentum=0.25, begin_step=10)
    np.testing.assert_array_equal(before["w"], params["w"])  # copied until begin
    after = ema_update(ema, params, step=10, momentum=0.25, begin_step=10)
    np.testing.assert_allclose(after["w"], [0.25, 2.5])  # ema + m (p - ema)


def test_param_overview_counts_and_bytes(full_tree):
    params, _, _ = full_tree
    labels = label_params(params, PLAN.labels, PLAN.groups)
    table = param_overview(params, labels)
    main = sum(x.size for k, x in _flat(params).items() if "adapter_main" in k)
    d = TINY.embed_dim  # 4 blocks of qkv (d -> 3d), proj, fc1 (d -> 4d), fc2; rank 8:
    assert main == 4 * 8 * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d))  # r (in + out)
    row = next(line for line in table.splitlines() if line.startswith("main "))
    assert row.split()[1:3] == [
        str(sum(1 for k in _flat(params) if "adapter_main" in k)),
        f"{main:,}",
    ]
    assert f"{main * 4 / 2**20:.2f}" == row.split()[3]
    total = sum(x.size for x in jax.tree.leaves(params))
    assert table.splitlines()[-1].endswith(f"of {total:,} parameters")


# ---- the groups train.py builds, method by method, against the recipe (RECIPE.md §5, §8)
LR = 1e-4


def _recipe(method: str, path: str, adapted: set[str]) -> tuple[float, float] | None:
    """(lr, initial weight decay) of a parameter as the recipe states it; None = frozen.

    Head: lr 1e-4; weight decay 0 for norms and the decoder's query_embed and level_embed, 0.05
    for the rest (query_feat and the pixel decoder's level embedding match no custom key of
    the official constructor). RecycleLoRA and its ablations: main lr ×1, sub lr ×0.5, both
    weight decay 0; PiSSA, MiLoRA and LoRA train their one adapter as main; SoMA trains the
    adapters and biases of its adapted layers at lr 5e-5 with weight decay; full fine-tuning
    the whole backbone at lr ×0.1, norms without decay. ``adapted``: the adapted layers' paths.
    """
    if path.startswith("head/"):
        no_decay = "norm" in path or path in (
            "head/transformer_decoder/query_embed",
            "head/transformer_decoder/level_embed",
        )
        return LR, 0.0 if no_decay else 0.05
    adapter = next((n for n in ("main", "sub", "lora") if f"/adapter_{n}/" in path), None)
    if method in ("recyclelora", "swapped", "main-only", "sub-only", "pissa", "milora", "lora"):
        return {"main": (LR, 0.0), "sub": (LR / 2, 0.0), "lora": (LR, 0.0)}.get(adapter)
    if method == "soma":
        adapted_bias = path.endswith("/bias") and path.rsplit("/", 1)[0] in adapted
        return (LR / 2, 0.05) if adapter or adapted_bias else None
    if method == "full":
        return LR / 10, 0.0 if "norm" in path else 0.05
    return None  # frozen


METHOD_ADAPTERS = {
    "recyclelora": {"main", "sub"}, "swapped": {"main", "sub"}, "main-only": {"main"},
    "sub-only": {"sub"}, "soma": {"lora"}, "pissa": {"lora"}, "milora": {"lora"},
    "lora": {"lora"}, "full": set(), "frozen": set(),
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_base_and_head(tiny_backbone):
    """The tiny backbone and the smoke config's Mask2Former head parameters (random values on
    its abstract shapes: no init compile)."""
    from recyclelora_jax import build

    base, _ = tiny_backbone
    cfg = smoke(base_config())
    model = build.build_segmentor(cfg, DinoV2(TINY, out_indices=OUT))
    feats = [jax.ShapeDtypeStruct((1, 4, 4, TINY.embed_dim), jnp.float32)] * 4  # 4 ViT maps
    shapes = jax.eval_shape(model.head.init, jax.random.key(0), feats)["params"]
    rng = np.random.default_rng(0)
    head = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), jnp.float32), shapes)
    return _Frozen((base, head))


class _Frozen(tuple):
    """A hashable handle on the fixture's trees (by identity), for ``functools.cache``."""

    __hash__ = object.__hash__
    __eq__ = object.__eq__


@functools.cache
def _train_groups(method, base_and_head):
    """What train.py builds for ``method``: config → recipe → adapters → labels → optimizer."""
    base, head = base_and_head
    cfg = smoke(apply_method(base_config(), method))
    adapted, _ = attach(base, TINY, recipe.from_config(cfg, TINY).attach, seed=0, progress=False)
    params = {"backbone": adapted, "head": head}
    part = recipe.partition(cfg, TINY, params)
    tx = make_optimizer(optim_config(cfg), part.plan.groups, part.trainable_labels)
    return cfg, params, part.trainable, tx


@pytest.mark.parametrize("method", sorted(METHOD_ADAPTERS))
def test_train_groups_of_every_method_follow_the_recipe(method, tiny_base_and_head):
    """One AdamW step (gradient 1) on the optimizer train.py builds: each leaf moves by
    ``-lr·(1 + wd·p)`` with its recipe's lr and weight decay, frozen leaves have no state."""
    cfg, params, trainable, tx = _train_groups(method, tiny_base_and_head)
    assert cfg.optim.lr == LR
    flat = _flat(params)
    adapted = {k.split("/adapter_")[0] for k in flat if "/adapter_" in k}
    want = {k: _recipe(method, k, adapted) for k in flat}
    assert set(_flat(trainable)) == {k for k, v in want.items() if v is not None}
    adapters = {k.split("/adapter_")[1].split("/")[0] for k in flat if "/adapter_" in k}
    assert adapters == METHOD_ADAPTERS[method]
    if method == "soma":  # SoMA's first block (of the smoke config's 4) has no adapter
        assert not any(k.startswith("backbone/blocks_0/") for k in _flat(trainable))
    grads = jax.tree.map(jnp.ones_like, trainable)
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    for key, update in _flat(updates).items():
        lr, wd = want[key]
        p = np.asarray(flat[key], np.float64)
        np.testing.assert_allclose(update, -lr * (1 + wd * p), rtol=1e-5, atol=1e-12, err_msg=key)


def test_ablation_plans_take_their_directions(tiny_base_and_head):
    """main-only, sub-only and swapped on the same kernels: main-only's adapter is
    RecycleLoRA's main, sub-only's its sub, swapped's main starts with RecycleLoRA's sub
    directions (major) and its sub is the minor end of RecycleLoRA's main."""
    b = {m: _flat(_train_groups(m, tiny_base_and_head)[1]) for m in ("recyclelora", "main-only",
                                                             "sub-only", "swapped")}  # fmt: skip
    key = "backbone/blocks_2/mlp/fc1/adapter_{}/b"
    main, sub = b["recyclelora"][key.format("main")], b["recyclelora"][key.format("sub")]
    r_sub = sub.shape[0]
    np.testing.assert_array_equal(b["main-only"][key.format("main")], main)
    np.testing.assert_array_equal(b["sub-only"][key.format("sub")], sub)
    np.testing.assert_allclose(b["swapped"][key.format("main")][:r_sub], sub, atol=1e-6)
    np.testing.assert_allclose(b["swapped"][key.format("sub")], main[-r_sub:], atol=1e-6)
    assert not np.allclose(np.abs(main[-r_sub:]), np.abs(sub), atol=1e-3)
