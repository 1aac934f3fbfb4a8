"""Memory of the jitted train step: gradients of the trainable leaves only vs of every leaf.

The step is ``train.py``'s (``train.trainer.make_train_step`` on ``abstract_train_state``): a
ViT-B/14 backbone with RecycleLoRA adapters (main 32 + sub 4) on all 48 linear layers, the
linear head and its pixel cross-entropy (the head's cost is not what is measured). Baselines
differentiate the whole tree through the same loss with the same AdamW groups: (a) frozen
leaves in an AdamW group with lr 0 (freezing by lr multiplier: gradients and Adam state for
every parameter); (b) frozen updates replaced by `optax.set_to_zero`, whose unused gradients
XLA may delete. Nothing is allocated: everything is shapes; `compiled.memory_analysis()`
reports XLA's buffer assignment (parameters and optimizer state donated in every variant).
"""

from __future__ import annotations

import argparse
import os
import platform

import jax
import optax

from recyclelora_jax import recipe
from recyclelora_jax.config import FROZEN, base_config
from recyclelora_jax.models.dinov2 import ARCHS
from recyclelora_jax.train import optim, trainer
from recyclelora_jax.train.sharding import make_mesh


def _naive_step(setup: trainer.Setup, optimizer: optax.GradientTransformation):
    loss_fn = trainer.make_loss_fn(setup)

    def step(params, opt_state, images, labels):
        grad = jax.grad(lambda p: loss_fn(p, {}, images, labels, jax.random.key(0))[0])
        updates, opt_state = optimizer.update(grad(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

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
    cfg = base_config()  # the paper's recipe, on the pretrained patch and position grid
    quarters = tuple(arch.depth * (i + 1) // 4 - 1 for i in range(4))
    cfg.model.backbone.update(
        arch=args.arch, patch_size=arch.patch_size, pos_grid=arch.pos_grid, out_indices=quarters
    )
    cfg.model.head = dict(name="linear", num_classes=19)
    cfg.data.crop_size = args.size
    cfg.train.batch_size = args.batch
    cfg.mesh.update(data=1, fsdp=1)
    setup, state, frozen, batch = trainer.abstract_train_state(cfg, make_mesh(**cfg.mesh))
    params = recipe.merge_trees(state["trainable"], frozen)
    n = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}")
    print(f"{args.arch}: {n(state['trainable']):,} trainable of {n(params):,} parameters")

    step = trainer.make_train_step(setup, state, frozen)
    ours = step.lower(state, frozen, batch).compile()

    ocfg = optim.optim_config(cfg)
    plan = recipe.from_config(cfg, setup.model.backbone.arch)
    transforms = {g.name: optim.group_transform(ocfg, g) for g in plan.groups}
    zero_lr = optim.group_transform(ocfg, recipe.ParamGroup(FROZEN, 0.0, False))
    baselines = {}
    for name, frozen_tx in (("all grads, lr-0 group", zero_lr), ("all grads, set_to_zero", None)):
        frozen_tx = frozen_tx or optax.set_to_zero()
        naive_opt = optax.partition({**transforms, FROZEN: frozen_tx}, setup.labels)
        naive_state = jax.eval_shape(naive_opt.init, params)
        naive = jax.jit(_naive_step(setup, naive_opt), donate_argnums=(0, 1))
        baselines[name] = naive.lower(params, naive_state, *batch.values()).compile()

    print(f"{'MiB':<28}{'args':>9}{'outputs':>9}{'temp':>9}{'aliased':>9}{'total':>9}{'GFLOP':>9}")
    total_ours = _report("trainable-only gradients", ours)
    for name, compiled in baselines.items():
        total = _report(name, compiled)
        print(f"  ratio trainable-only / ({name}): {total_ours / total:.3f}")


if __name__ == "__main__":
    main()
