"""Every import inside the package points down the module map of ``docs/DESIGN.md``: no cycles,
``models/`` imports only ``models/``, and nothing below the trainer imports it."""

from __future__ import annotations

import ast

from train_helpers import REPO

PACKAGE = REPO / "recyclelora_jax"
# The module map's layers, lowest first (a module takes the rank of its longest prefix).
RANK = {
    "config": 0,
    "models": 1,
    "data": 1,
    "pth": 1,
    "safetensors_file": 0,
    "model_io": 1,
    "train.sharding": 1,
    "train.checkpoint": 1,
    "train.metrics_log": 1,
    "peft": 2,
    "losses": 2,
    "evaluate": 2,
    "pretrain": 2,
    "convert": 3,
    "recipe": 3,
    "heads": 3,
    "runner": 3,
    "build": 4,
    "official": 4,
    "train.optim": 4,
    "export": 5,
    "analysis": 5,
    "train": 6,  # the trainer and the package's own __init__
    "preflight": 7,
    "compare": 7,
    "demo": 7,
    "": 8,  # recyclelora_jax/__init__.py: the public names
}


def _name(path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = PACKAGE.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path) -> set[str]:
    """Package modules imported anywhere in ``path`` (``from pkg import submodule`` counts as
    the submodule, not the package)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = [s for s in subs if _is_module(s.removeprefix("recyclelora_jax."))]
            if len(names) < len(subs):
                names.append(node.module)
        else:
            continue
        out |= {
            n.removeprefix("recyclelora_jax").lstrip(".")
            for n in names
            if n.startswith("recyclelora_jax")
        }
    return out


def _rank(module: str) -> int:
    keys = [k for k in RANK if module == k or module.startswith(k + ".") or not k]
    return RANK[max(keys, key=len)]


def test_every_import_points_down_and_there_are_no_cycles():
    graph = {_name(p): _imports(p) - {_name(p)} for p in PACKAGE.rglob("*.py")}
    upward = [
        f"{m} ({_rank(m)}) imports {d} ({_rank(d)})"
        for m, deps in graph.items()
        for d in deps
        if _rank(d) > _rank(m)
    ]
    assert not upward, upward
    for m, deps in graph.items():
        if m.startswith("models"):
            assert all(d.startswith("models") for d in deps), (m, deps)
    seen: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> None:
        if seen.get(m) == 1:
            raise AssertionError(f"import cycle: {' -> '.join([*path, m])}")
        if seen.get(m) == 2:
            return
        seen[m] = 1
        for d in sorted(graph.get(m, ())):
            if d != "" and not (m.startswith(d + ".") and d in graph):  # a package's own init
                visit(d, [*path, m])
        seen[m] = 2

    for m in sorted(graph):
        visit(m, [])
