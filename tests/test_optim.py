"""Parameter groups and the RECIPE.md §5 optimizer against torch's AdamW and LR schedulers."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from _peft_fixtures import OUT, TINY, tiny_backbone
from flax import traverse_util

from recyclelora_jax import recipe
from recyclelora_jax.config import (
    FROZEN,
    apply_method,
    base_config,
    recyclelora_adapters,
    smoke,
)
from recyclelora_jax.models.dinov2 import DinoV2
from recyclelora_jax.peft.params import attach, attach_shapes
from recyclelora_jax.recipe import ParamGroup, label_params, merge_trees, split_trainable
from recyclelora_jax.train.optim import (
    OptimConfig,
    cosine_wd,
    ema_update,
    group_transform,
    make_optimizer,
    make_train_step,
    optim_config,
    param_overview,
    poly_lr,
    value_and_grad_trainable,
)

STEPS = (0, 1, 20_000, 39_999, 40_000)


def _plan(method: str = "recyclelora") -> recipe.Recipe:
    """The config's recipe on the tiny backbone: RecycleLoRA 8 + 2, or ``method`` at smoke size
    (SoMA then adapts blocks 1-3)."""
    c = base_config()
    c.adapters = recyclelora_adapters(main=8, sub=2)
    if method != "recyclelora":
        c = smoke(apply_method(c, method))
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
def full_tree():
    return _full_tree()


def _full_tree(seed=0):
    backbone, images = tiny_backbone(seed)
    backbone, layout = attach(backbone, TINY, PLAN.attach, progress=False)
    rng = np.random.default_rng(seed)
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


def _loss_fn(layout):
    model = DinoV2(TINY, out_indices=OUT, layerscale_init=1.0, adapters=layout)

    def loss(params, images):
        feats = model.apply({"params": params["backbone"]}, images)["features"][-1]
        h = params["head"]
        y = feats.mean((1, 2)) @ h["proj"]["kernel"] + h["proj"]["bias"]
        y = y * h["out_norm"]["scale"] + h["out_norm"]["bias"]
        queries = h["transformer_decoder"]["query_embed"] + h["transformer_decoder"]["query_feat"]
        return jnp.mean((y[:, None] - queries) ** 2)

    return loss


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
    return p * (1 - lr * wd) - lr * g / (np.abs(g) + 1e-8)


def test_three_steps_frozen_untouched_groups_use_their_lr(full_tree):
    params, layout, images = full_tree
    cfg = OptimConfig(total_steps=10)
    labels = label_params(params, PLAN.labels, PLAN.groups)
    trainable, frozen = split_trainable(params, labels)
    trainable_labels, _ = split_trainable(labels, labels)
    optimizer = make_optimizer(cfg, PLAN.groups, trainable_labels)
    opt_state = optimizer.init(trainable)
    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    n_frozen = sum(x.size for x in jax.tree.leaves(frozen))
    state_floats = sum(x.size for x in jax.tree.leaves(opt_state) if x.dtype == jnp.float32)
    assert n_frozen > n_trainable and state_floats == 2 * n_trainable  # mu, nu: trainable only

    grad_fn = jax.jit(value_and_grad_trainable(_loss_fn(layout)))
    step = jax.jit(make_train_step(_loss_fn(layout), optimizer))
    torch_opt, torch_params = _torch_adamw(trainable, trainable_labels)
    torch_sched = torch.optim.lr_scheduler.PolynomialLR(torch_opt, total_iters=10, power=0.9)
    start = _flat(trainable)
    for t in range(3):
        _, grads = grad_fn(trainable, frozen, images)
        grads = _flat(grads)
        assert grads.keys() == start.keys()  # no gradient exists for frozen leaves
        for group in torch_opt.param_groups:  # mmengine: anneal wd per iteration
            w0 = group["initial_wd"]
            group["weight_decay"] = 1e-5 + (w0 - 1e-5) * (1 + math.cos(math.pi * t / 10)) / 2
            group["params"][0].grad = torch.tensor(np.asarray(grads[group["key"]]))
        torch_opt.step()
        torch_sched.step()
        before = _flat(trainable)
        trainable, opt_state, _ = step(trainable, frozen, opt_state, images)
        if t == 0:  # hand-computed first step: main at lr 1e-4, sub at 5e-5, both wd 0
            for name, lr in (("main", 1e-4), ("sub", 5e-5)):
                key = f"backbone/blocks_1/attn/qkv/adapter_{name}/b"
                want = _adamw_first_step(np.asarray(before[key]), np.asarray(grads[key]), lr, 0.0)
                np.testing.assert_allclose(_flat(trainable)[key], want, rtol=0, atol=1e-8)
        for key, value in _flat(trainable).items():
            _assert_same_update(np.asarray(value), torch_params[key].numpy(), start[key])
    after = _flat(merge_trees(trainable, frozen))
    for key, value in _flat(frozen).items():
        np.testing.assert_array_equal(after[key], value)  # bit-identical
    for key in (k for k in start if "adapter_" in k):
        assert not np.array_equal(after[key], start[key]), key


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
    return torch.optim.AdamW(param_groups, betas=(0.9, 0.999), eps=1e-8), tensors


def _naive_step(loss_fn, cfg, labels):
    """The wasteful baseline: differentiate every leaf, freeze by an lr-0 AdamW group."""
    transforms = {g.name: group_transform(cfg, g) for g in PLAN.groups}
    zero_lr = group_transform(cfg, ParamGroup(FROZEN, 0.0, False))
    optimizer = optax.partition({**transforms, FROZEN: zero_lr}, labels)

    def step(params, opt_state, images):
        loss, grads = jax.value_and_grad(loss_fn)(params, images)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return optimizer, step


def test_trainable_only_step_needs_less_memory(full_tree):
    params, layout, images = full_tree
    cfg = OptimConfig(total_steps=10)
    labels = label_params(params, PLAN.labels, PLAN.groups)
    trainable, frozen = split_trainable(params, labels)
    optimizer = make_optimizer(cfg, PLAN.groups, split_trainable(labels, labels)[0])
    step = jax.jit(make_train_step(_loss_fn(layout), optimizer), donate_argnums=(0, 2))
    ours = step.lower(trainable, frozen, optimizer.init(trainable), images).compile()
    naive_opt, naive = _naive_step(_loss_fn(layout), cfg, labels)
    naive = jax.jit(naive, donate_argnums=(0, 1))
    full = naive.lower(params, naive_opt.init(params), images).compile()

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
    frozen_bytes = sum(x.nbytes for x in jax.tree.leaves(frozen))
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
    assert main == 4 * 8 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))  # r (in + out)
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
def tiny_base_and_head():
    """The tiny backbone and the smoke config's Mask2Former head parameters (random values on
    its abstract shapes: no init compile)."""
    from recyclelora_jax import build

    base, _ = tiny_backbone(0)
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
    plan = recipe.from_config(cfg, TINY)
    adapted, _ = attach(base, TINY, plan.attach, seed=0, progress=False)
    params = {"backbone": adapted, "head": head}
    labels = label_params(params, plan.labels, plan.groups)
    trainable, _ = split_trainable(params, labels)
    trainable_labels, _ = split_trainable(labels, labels)
    tx = make_optimizer(optim_config(cfg), plan.groups, trainable_labels)
    return cfg, params, trainable, tx


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
