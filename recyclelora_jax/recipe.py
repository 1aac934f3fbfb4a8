"""A config's recipe tables as the objects that act on them, for one backbone architecture.

``cfg.adapters`` becomes the attach rules (``peft.params``); the labels of the adapter leaves and
of the adapted layers' biases are derived from the layers those rules actually adapt, followed by
``cfg.params`` (the rest of the tree); ``cfg.groups`` become the optimizer's parameter groups.
Nothing here touches a parameter: the recipe of a 1 B-parameter model resolves from its
architecture alone.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
from flax import traverse_util

from recyclelora_jax.config import FROZEN
from recyclelora_jax.models.adapters import ADAPTER_PREFIX
from recyclelora_jax.models.dinov2 import DinoV2Arch
from recyclelora_jax.peft.init import get_init
from recyclelora_jax.peft.params import AttachRule, resolve_rules

LabelRule = tuple[str, str]  # (regex searched in the "/"-joined path, group name or FROZEN)
Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ParamGroup:
    """A trainable group: lr multiplier and whether it starts with the base weight decay
    (``False`` starts at 0 and, annealed, still rises toward ``wd_eta_min``, as in mmengine)."""

    name: str
    lr_mult: float = 1.0
    weight_decay: bool = True


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Which layers get which adapters (``attach``) and how every parameter trains (``labels``,
    first match wins, and the ``groups`` they name)."""

    attach: tuple[AttachRule, ...]
    labels: tuple[LabelRule, ...]
    groups: tuple[ParamGroup, ...]


def attach_rules(adapters: Sequence[Mapping], depth: int) -> tuple[AttachRule, ...]:
    """``cfg.adapters`` entries as rules; ranks ordered as the init creates its adapters."""
    rules = []
    for i, entry in enumerate(adapters):
        names = get_init(entry["init"]).adapter_names
        ranks = dict(entry["ranks"])
        if sorted(ranks) != sorted(names):
            raise ValueError(
                f"adapters[{i}]: init {entry['init']!r} creates adapters {list(names)}, "
                f"ranks name {sorted(ranks)}"
            )
        first, stop = entry["blocks"]
        rules.append(
            AttachRule(
                entry["layers"],
                entry["init"],
                tuple((n, int(ranks[n])) for n in names),
                float(entry["alpha"]),
                (int(first), depth if stop is None else min(int(stop), depth)),
            )
        )
    return tuple(rules)


def adapter_labels(
    adapters: Sequence[Mapping], rules: Sequence[AttachRule], chosen: Mapping[str, AttachRule]
) -> tuple[LabelRule, ...]:
    """Label rules naming exactly the adapted layers (``chosen``: path -> its rule): every
    adapter leaf gets its entry's group, the layer's bias the entry's ``bias`` group."""
    entry_of = {id(rule): entry for rule, entry in zip(rules, adapters, strict=True)}
    paths: dict[tuple[str, str], list[str]] = {}
    for path, rule in chosen.items():
        entry = entry_of[id(rule)]
        for name, _ in rule.ranks:
            if name not in entry["groups"]:
                raise ValueError(
                    f"adapters entry {entry['init']!r} has no group for adapter {name!r} "
                    f"(groups: {dict(entry['groups'])})"
                )
            key = (f"{ADAPTER_PREFIX}{name}/", entry["groups"][name])
            paths.setdefault(key, []).append(path)
        if entry.get("bias", FROZEN) != FROZEN:
            paths.setdefault(("bias$", entry["bias"]), []).append(path)
    return tuple(
        (rf"^backbone/({'|'.join(map(re.escape, layer_paths))})/{leaf}", group)
        for (leaf, group), layer_paths in paths.items()
    )


def param_groups(groups: Mapping[str, Mapping]) -> tuple[ParamGroup, ...]:
    return tuple(
        ParamGroup(name, float(g["lr_mult"]), bool(g["weight_decay"])) for name, g in groups.items()
    )


def from_config(cfg: ml_collections.ConfigDict, arch: DinoV2Arch) -> Recipe:
    """The recipe of ``cfg`` on ``arch`` (which decides the linear layers and the depth)."""
    rules = attach_rules(cfg.adapters, arch.depth)
    chosen = resolve_rules(arch, rules)
    labels = (*adapter_labels(cfg.adapters, rules, chosen), *(tuple(r) for r in cfg.params))
    return Recipe(rules, labels, param_groups(cfg.groups))


@dataclasses.dataclass(frozen=True)
class Partition:
    """A full parameter tree cut by its config's recipe: the recipe, a group label per leaf,
    and the trainable and frozen subtrees (the leaves may be arrays or shapes)."""

    plan: Recipe
    labels: Params
    trainable: Params
    frozen: Params

    @property
    def trainable_labels(self) -> Params:
        """The labels of the trainable leaves: what the optimizer partitions."""
        return split_trainable(self.labels, self.labels)[0]


def partition(cfg: ml_collections.ConfigDict, arch: DinoV2Arch, params: Params) -> Partition:
    """``params`` ``{"backbone", "head"}`` of ``cfg``'s model on ``arch``, labelled by its recipe
    and split into what trains and what stays frozen: what the trainer builds its optimizer
    from and what a restore puts the checkpoint's ``trainable`` item over."""
    plan = from_config(cfg, arch)
    labels = label_params(params, plan.labels, plan.groups)
    trainable, frozen = split_trainable(params, labels)
    return Partition(plan, labels, trainable, frozen)


# ------------------------------------------------------------- labels on parameter trees


def label_params(
    params: Params, rules: Sequence[tuple[str, str]], groups: Sequence[ParamGroup] = ()
) -> Params:
    """A tree of group names, one per leaf: the first rule whose regex is found in the path.

    Raises naming every uncovered path, and (when ``groups`` is given) any rule naming a group
    that is neither defined nor ``FROZEN``.
    """
    if groups:
        known = {g.name for g in groups} | {FROZEN}
        unknown = sorted({name for _, name in rules} - known)
        if unknown:
            raise ValueError(f"label rules name undefined groups {unknown}; known: {sorted(known)}")
    compiled = [(re.compile(pattern), name) for pattern, name in rules]
    labels, uncovered = {}, []
    for path in traverse_util.flatten_dict(params, sep="/"):
        name = next((n for pattern, n in compiled if pattern.search(path)), None)
        if name is None:
            uncovered.append(path)
        labels[path] = name
    if uncovered:
        raise ValueError(f"{len(uncovered)} parameters match no label rule: {uncovered}")
    return traverse_util.unflatten_dict(labels, sep="/")


def _select(params: Params, labels: Params, keep: Callable[[str], bool]) -> Params:
    flat_labels = traverse_util.flatten_dict(labels, sep="/")
    flat = traverse_util.flatten_dict(params, sep="/")
    if flat.keys() != flat_labels.keys():
        missing = sorted(flat.keys() ^ flat_labels.keys())
        raise ValueError(f"params and labels differ at {missing}")
    return traverse_util.unflatten_dict(
        {k: v for k, v in flat.items() if keep(flat_labels[k])}, sep="/"
    )


def split_trainable(params: Params, labels: Params) -> tuple[Params, Params]:
    """``(trainable, frozen)`` subtrees; differentiate only the first."""
    return (
        _select(params, labels, lambda name: name != FROZEN),
        _select(params, labels, lambda name: name == FROZEN),
    )


def merge_trees(a: Params, b: Params) -> Params:
    """Union of two trees with disjoint leaves (the inverse of ``split_trainable``)."""
    flat_a = traverse_util.flatten_dict(a, sep="/")
    flat_b = traverse_util.flatten_dict(b, sep="/")
    shared = sorted(flat_a.keys() & flat_b.keys())
    if shared:
        raise ValueError(f"trees overlap at {shared}")
    return traverse_util.unflatten_dict({**flat_a, **flat_b}, sep="/")
