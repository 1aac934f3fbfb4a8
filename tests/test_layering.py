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
    "classes": 0,
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
    # The loss shares its point sampling with deformable attention through models.sampling; it
    # does not reach into the attention module (or any head) for it.
    reached = {d for m, deps in graph.items() if m.startswith("losses") for d in deps}
    assert not {d for d in reached if d.startswith(("models.msdeform", "models.mask2former"))}
    assert "models.sampling" in reached
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


def test_classes_ignore_palette_and_normalisation_have_one_owner():
    """``classes.py`` alone spells out the class names, the ignore id, the palette and the
    normalisation constants; any other module that writes one of them as a literal fails here."""
    from recyclelora_jax import classes

    owner = PACKAGE / "classes.py"
    constants = {
        "class names": set(classes.CLASS_NAMES),
        "palette": set(classes.PALETTE),
        "mean": set(classes.MEAN_RGB),
        "std": set(classes.STD_RGB),
    }
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == owner:
            continue
        where = path.relative_to(REPO)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List)) and len(node.elts) >= 3:
                try:
                    items = {tuple(x) if isinstance(x, list) else x for x in ast.literal_eval(node)}
                except (ValueError, TypeError):
                    continue
                found += [
                    f"{where}:{node.lineno} {what}" for what, v in constants.items() if v <= items
                ]
            pairs = []  # (bound name, value) of assignments, fields and argument defaults
            if isinstance(node, ast.Assign):
                pairs = [(t.id, node.value) for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                pairs = [(node.target.id, node.value)]
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                positional = (a.posonlyargs + a.args)[::-1]  # defaults belong to the last ones
                pairs = [(x.arg, d) for x, d in zip(positional, a.defaults[::-1], strict=False)]
                pairs += [(x.arg, d) for x, d in zip(a.kwonlyargs, a.kw_defaults, strict=True)]
            found += [
                f"{where}:{node.lineno} ignore value {name}"
                for name, value in pairs
                if "ignore" in name.lower()
                and isinstance(value, ast.Constant)
                and value.value == classes.IGNORE
            ]
    assert not found, found
