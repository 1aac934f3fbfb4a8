"""Memory of the jitted train step: gradients of the trainable leaves only vs of every leaf.

ViT-B/14 backbone (86 M parameters) with RecycleLoRA adapters (main 32 + sub 4) on all 48
linear layers; loss = mean square of the four feature maps. Both steps run the same AdamW
groups. Baselines differentiate the whole tree: (a) frozen leaves in an AdamW group with lr 0
(freezing by lr multiplier: gradients and Adam state for all 92 M parameters); (b) frozen
updates replaced by `optax.set_to_zero`, whose unused gradients XLA may delete. Nothing is
allocated: parameters are shapes from `jax.eval_shape`; `compiled.memory_analysis()` reports
XLA's buffer assignment (parameters and optimizer state donated in every variant).
"""

from __future__ import annotations

import argparse
import os
import platform

import jax
import jax.numpy as jnp
import optax

from recyclelora_jax import recipe
from recyclelora_jax.config import base_config
from recyclelora_jax.models.dinov2 import ARCHS, DinoV2
from recyclelora_jax.peft.params import attach_shapes
from recyclelora_jax.recipe import from_config
from recyclelora_jax.train import optim


def _loss_fn(model: DinoV2):
    def loss(params, images):
        feats = model.apply({"params": params["backbone"]}, images)["features"]
        return sum(jnp.mean(f.astype(jnp.float32) ** 2) for f in feats)

    return loss


def _naive_step(model: DinoV2, optimizer: optax.GradientTransformation):
    def step(params, opt_state, images):
        loss, grads = jax.value_and_grad(_loss_fn(model))(params, images)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def _report(name: str, compiled) -> int:
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    total -= m.alias_size_in_bytes
    mib = lambda n: f"{n / 2**20:9.1f}"
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    print(
        f"{name:<28}{mib(m.argument_size_in_bytes)}{mib(m.output_size_in_bytes)}"
        f"{mib(m.temp_size_in_bytes)}{mib(m.alias_size_in_bytes)}{mib(total)}"
        f"{cost.get('flops', float('nan')) / 1e9:9.1f}"
    )
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vitb14")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    args = parser.parse_args()
    arch = ARCHS[args.arch]
    plan = from_config(base_config(), arch)  # the paper's recipe
    backbone, layout = attach_shapes(arch, plan.attach)
    model = DinoV2(arch, out_indices=(2, 5, 8, 11), adapters=layout)
    params = {"backbone": backbone}
    images = jax.ShapeDtypeStruct((args.batch, args.size, args.size, 3), jnp.float32)
    cfg = optim.OptimConfig()
    labels = recipe.label_params(params, plan.labels, plan.groups)
    trainable, frozen = recipe.split_trainable(params, labels)
    trainable_labels, _ = recipe.split_trainable(labels, labels)
    n = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}")
    print(f"{args.arch}: {n(trainable):,} trainable of {n(params):,} parameters")

    optimizer = optim.make_optimizer(cfg, plan.groups, trainable_labels)
    step = optim.make_train_step(_loss_fn(model), optimizer)
    state = jax.eval_shape(optimizer.init, trainable)
    ours = jax.jit(step, donate_argnums=(0, 2)).lower(trainable, frozen, state, images).compile()

    transforms = {g.name: optim.group_transform(cfg, g) for g in plan.groups}
    zero_lr = optim.group_transform(cfg, recipe.ParamGroup("frozen", 0.0, False))
    baselines = {}
    for name, frozen_tx in (("all grads, lr-0 group", zero_lr), ("all grads, set_to_zero", None)):
        frozen_tx = frozen_tx or optax.set_to_zero()
        naive_opt = optax.partition({**transforms, optim.FROZEN: frozen_tx}, labels)
        naive_state = jax.eval_shape(naive_opt.init, params)
        naive = jax.jit(_naive_step(model, naive_opt), donate_argnums=(0, 1))
        baselines[name] = naive.lower(params, naive_state, images).compile()

    print(f"{'MiB':<28}{'args':>9}{'outputs':>9}{'temp':>9}{'aliased':>9}{'total':>9}{'GFLOP':>9}")
    total_ours = _report("trainable-only gradients", ours)
    for name, compiled in baselines.items():
        total = _report(name, compiled)
        print(f"  ratio trainable-only / ({name}): {total_ours / total:.3f}")


if __name__ == "__main__":
    main()
