"""The paper's adapter analyses (RECIPE.md §7): effective rank, similarity heatmaps, Grassmann
distance between main and sub subspaces, and the init-column norm ratio of a trained update.

``python -m recyclelora_jax.analysis --help``: compares initialisations on a loaded or random
backbone, and analyses a trained adapter tree next to the init it started from.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from matplotlib.figure import Figure  # not pyplot: no global backend or figure state
from matplotlib.ticker import MaxNLocator

from recyclelora_jax.model_io import load_tree
from recyclelora_jax.models.adapters import ADAPTER_PREFIX, AdapterLayout
from recyclelora_jax.models.dinov2 import ARCHS, DinoV2, DinoV2Arch
from recyclelora_jax.peft.init import get_init
from recyclelora_jax.peft.params import AttachRule, attach

Params = dict[str, Any]


def update_singular_values(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Singular values of ``a @ b`` (in, out) from two thin QRs: the product is never formed."""
    _, ra = np.linalg.qr(np.asarray(a, np.float64))
    _, rb = np.linalg.qr(np.asarray(b, np.float64).T)
    return np.linalg.svd(ra @ rb.T, compute_uv=False)


def effective_rank(singular_values: np.ndarray) -> float:
    """``exp(-sum p_i log p_i)`` with ``p_i = s_i / sum s``; 0 for the zero matrix."""
    s = np.asarray(singular_values, np.float64)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def cosine_similarity(vectors: np.ndarray) -> np.ndarray:
    """Pairwise cosine similarity of the rows; NaN where a row is zero (e.g. LoRA's ``B``)."""
    v = np.asarray(vectors, np.float64)
    norms = np.linalg.norm(v, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (v @ v.T) / np.outer(norms, norms)


def _basis(m: np.ndarray) -> np.ndarray:
    """Orthonormal basis of the column space of ``m`` (rank-revealing, via SVD)."""
    u, s, _ = np.linalg.svd(np.asarray(m, np.float64), full_matrices=False)
    keep = s > s.max(initial=0.0) * max(m.shape) * np.finfo(np.float64).eps
    return u[:, keep]


def grassmann_distance(u1: np.ndarray, u2: np.ndarray) -> float:
    """``sqrt(sum theta_i^2)`` over the principal angles between the column spaces of ``u1`` and
    ``u2`` (``cos theta_i`` = singular values of ``Q1^T Q2``); NaN if either space is empty."""
    q1, q2 = _basis(u1), _basis(u2)
    if not q1.shape[1] or not q2.shape[1]:
        return float("nan")
    cosines = np.clip(np.linalg.svd(q1.T @ q2, compute_uv=False), 0.0, 1.0)
    return float(np.sqrt((np.arccos(cosines) ** 2).sum()))


def init_column_norm_ratio(update: np.ndarray, chosen: np.ndarray) -> float:
    """Mean norm of the update's input columns chosen at init over the mean of the others.

    ``update`` is a Flax (in, out) matrix, so PyTorch column ``j`` of ``ΔW`` is row ``j`` here.
    """
    norms = np.linalg.norm(np.asarray(update, np.float64), axis=1)
    mask = np.zeros(len(norms), bool)
    mask[chosen] = True
    if mask.all() or not mask.any():
        raise ValueError(f"need chosen and other columns, got {mask.sum()} of {len(mask)} chosen")
    return float(norms[mask].mean() / norms[~mask].mean())


def _layer(params: Params, path: str) -> Params:
    node = params
    for part in path.split("/"):
        node = node[part]
    return node


def _adapter(layer: Params, name: str) -> tuple[np.ndarray, np.ndarray]:
    pair = layer[ADAPTER_PREFIX + name]
    return np.asarray(pair["a"]), np.asarray(pair["b"])


def adapter_stats(params: Params, layout: AdapterLayout) -> dict[str, Any]:
    """Per layer: effective rank and rank efficiency of each adapter's ``s·a@b``, and the
    Grassmann distances between the first two adapters' output (``B``) and input (``A``)
    subspaces; plus means per layer type and adapter."""
    layers: dict[str, Any] = {}
    for path, spec in layout:
        layer = _layer(params, path)
        entry: dict[str, Any] = {}
        for name, rank in spec.ranks:
            er = effective_rank(update_singular_values(*_adapter(layer, name)))
            entry[name] = {"effective_rank": er, "rank_efficiency": er / rank}
        if len(spec.ranks) >= 2:
            (a1, b1), (a2, b2) = (_adapter(layer, n) for n, _ in spec.ranks[:2])
            entry["grassmann_b"] = grassmann_distance(b1.T, b2.T)
            entry["grassmann_a"] = grassmann_distance(a1, a2)
        layers[path] = entry
    by_type: dict[str, dict[str, dict[str, float]]] = {}
    for path, spec in layout:
        kind = path.rsplit("/", 1)[-1]
        for name, _ in spec.ranks:
            stats = by_type.setdefault(kind, {}).setdefault(name, {})
            for key, value in layers[path][name].items():
                stats.setdefault(key, []).append(value)
    means = {
        kind: {n: {k: float(np.mean(v)) for k, v in s.items()} for n, s in names.items()}
        for kind, names in by_type.items()
    }
    return {"layers": layers, "by_type": means}


def column_norm_ratios(
    trained: Params, init: Params, layout: AdapterLayout, adapter: str = "main"
) -> dict[str, float]:
    """Per layer: the init-column norm ratio of the learned update ``s(a b - a0 b0)``, with the
    columns chosen at init being the rows where ``a0`` is non-zero (RRQR's pivots)."""
    ratios = {}
    for path, spec in layout:
        if adapter not in dict(spec.ranks):
            continue
        a0, b0 = _adapter(_layer(init, path), adapter)
        a1, b1 = _adapter(_layer(trained, path), adapter)
        update = spec.scale * (a1.astype(np.float64) @ b1 - a0.astype(np.float64) @ b0)
        ratios[path] = init_column_norm_ratio(update, np.flatnonzero(np.abs(a0).sum(1)))
    return ratios


def principal_components(x: np.ndarray, k: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA of the rows of ``x`` (N, C): the first ``k`` components (k, C), the centred rows'
    projections on them (N, k) and their explained-variance ratios (k,). Each component's sign
    is fixed so that its largest-magnitude loading is positive (SVD leaves it arbitrary)."""
    centred = np.asarray(x, np.float64) - np.mean(x, 0, dtype=np.float64)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    components = vt[:k]
    pivots = np.abs(components).argmax(1)
    components = components * np.sign(components[np.arange(len(components)), pivots])[:, None]
    variance = s**2
    return components, centred @ components.T, variance[:k] / max(variance.sum(), 1e-300)


def without_adapter(backbone: Params, name: str) -> Params:
    """The backbone tree with every ``name`` adapter's branch removed (its ``b`` zeroed)."""
    if isinstance(backbone, dict):
        return {
            k: {**v, "b": np.zeros_like(v["b"])}
            if k == ADAPTER_PREFIX + name
            else without_adapter(v, name)
            for k, v in backbone.items()
        }
    return backbone


def feature_change(backbone: DinoV2, params: Params, image: np.ndarray, name: str) -> np.ndarray:
    """What adapter ``name`` changes: the backbone's last output feature map on ``image``
    (1, H, W, 3 normalised) with all adapters minus the same without ``name``'s branch,
    (gh, gw, C)."""

    def last(p: Params) -> np.ndarray:
        return np.asarray(backbone.apply({"params": p}, image)["features"][-1][0], np.float64)

    return last(params) - last(without_adapter(params, name))


def change_rgb(change: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first three principal components of a (gh, gw, C) map as RGB in [0, 1] (each
    component min-max scaled), and their explained-variance ratios."""
    gh, gw, c = change.shape
    _, projected, ratios = principal_components(change.reshape(gh * gw, c), 3)
    lo, hi = projected.min(0), projected.max(0)
    rgb = (projected - lo) / np.where(hi > lo, hi - lo, 1.0)
    return rgb.reshape(gh, gw, -1), ratios


def plot_feature_change(
    image: np.ndarray, rgb: np.ndarray, ratios: np.ndarray, title: str, file: Path
) -> None:
    """The image beside its feature change's first three principal components as RGB."""
    fig = Figure(figsize=(8, 2.4 + 2.4 * image.shape[0] / image.shape[1]))
    left, right = fig.subplots(1, 2)
    left.imshow(image)
    left.set_title("image")
    right.imshow(rgb, interpolation="nearest")
    shares = ", ".join(f"{100 * r:.0f}" for r in ratios)
    right.set_title(f"{title}: PCs 1-3 as RGB ({shares} % of variance)")
    for ax in (left, right):
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(file, dpi=110)


def feature_change_figures(run: Path, image_file: Path, out: Path) -> dict[str, list[float]]:
    """One ``feature_change_<adapter>.png`` per adapter of the trained run in ``run`` (its
    workdir) on ``image_file``; returns each adapter's explained-variance ratios."""
    from PIL import Image

    from recyclelora_jax.data.transforms import normalize
    from recyclelora_jax.export import restore_run

    model, params, _ = restore_run(run)
    backbone = model.backbone
    names = sorted({n for _, spec in backbone.adapters for n, _ in spec.ranks})
    if not names:
        raise ValueError(f"the run in {run} has no adapters (method frozen or full?)")
    with Image.open(image_file) as im:
        image = np.asarray(im.convert("RGB"))
    p = backbone.arch.patch_size
    image = image[: image.shape[0] // p * p, : image.shape[1] // p * p]
    batch = normalize(image)[None]
    tree = jax.device_get(params["backbone"])
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name in names:
        rgb, ratios = change_rgb(feature_change(backbone, tree, batch, name))
        file = out / f"feature_change_{name}.png"
        plot_feature_change(image, rgb, ratios, f"{name} adapter", file)
        summary[name] = [float(r) for r in ratios]
    return summary


def plot_similarity(params: Params, layout: AdapterLayout, path: str, title: str, file: Path):
    """Cosine-similarity heatmaps of the rows of ``A`` and columns of ``B`` of layer ``path``."""
    spec = dict(layout).get(path)
    if spec is None:
        raise KeyError(f"layer {path!r} has no adapters; adapted: {[p for p, _ in layout][:8]}…")
    names = [n for n, _ in spec.ranks]
    fig = Figure(figsize=(8, 3.6 * len(names)))
    axes = fig.subplots(len(names), 2, squeeze=False)
    for row, name in enumerate(names):
        a, b = _adapter(_layer(params, path), name)
        for col, (label, vectors) in enumerate((("rows of A", a.T), ("columns of B", b))):
            ax = axes[row, col]
            image = ax.imshow(cosine_similarity(vectors), vmin=-1, vmax=1, cmap="RdBu_r")
            ax.set_title(f"{name}: {label} (r={len(vectors)})")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(f"{title} — {path}")
    fig.tight_layout()
    fig.savefig(file, dpi=110)


def plot_grassmann(results: dict[str, dict[str, Any]], file: Path) -> None:
    """Grassmann distance between the two adapters' ``B`` subspaces, per block and layer type."""
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    for method, stats in results.items():
        series: dict[str, list[tuple[int, float]]] = {}
        for path, entry in stats["layers"].items():
            if "grassmann_b" in entry:
                block = int(re.match(r"blocks_(\d+)/", path).group(1))
                series.setdefault(path.rsplit("/", 1)[-1], []).append((block, entry["grassmann_b"]))
        for kind, points in series.items():
            x, y = zip(*sorted(points), strict=True)
            ax.plot(x, y, marker="o", label=f"{method} {kind}")
    ax.set_xlabel("block")
    ax.set_ylabel("Grassmann distance (rad)")
    top = max((max(line.get_ydata()) for line in ax.get_lines()), default=1.0)
    ax.set_ylim(0, 1.15 * top)  # from 0, with room above the (often flat) init curves
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_title("main vs sub adapter output subspaces")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(file, dpi=110)


def _rule(method: str, args: argparse.Namespace) -> AttachRule:
    sizes = {"main": args.r_main, "sub": args.r_sub, "lora": args.rank}
    names = get_init(method).adapter_names
    alpha = args.lora_alpha if names == ("lora",) else args.alpha
    return AttachRule(args.layers, method, tuple((n, sizes[n]) for n in names), alpha)


def _backbone(args: argparse.Namespace) -> tuple[DinoV2Arch, Params, str]:
    if args.checkpoint:
        from recyclelora_jax.convert import load_dinov2

        model, params = load_dinov2(args.checkpoint)
        return model.arch, params, str(args.checkpoint)
    if args.arch not in ARCHS:
        raise SystemExit(f"--arch must be one of {sorted(ARCHS)}, got {args.arch!r}")
    arch = ARCHS[args.arch]
    images = jax.ShapeDtypeStruct((1, arch.patch_size, arch.patch_size, 3), np.float32)
    params = jax.jit(DinoV2(arch, out_indices=()).init)(jax.random.key(args.seed), images)
    return arch, params["params"], f"random {args.arch} (seed {args.seed})"


def _finite(tree: Any) -> Any:
    """NaN (an undefined distance or similarity) as JSON null, so the summary is strict JSON."""
    if isinstance(tree, dict):
        return {k: _finite(v) for k, v in tree.items()}
    if isinstance(tree, float) and not np.isfinite(tree):
        return None
    return tree


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m recyclelora_jax.analysis",
        description="Compare adapter initialisations (and optionally a trained adapter tree): "
        "effective rank, similarity heatmaps, Grassmann distances, init-column norm ratio.",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory (JSON + PNGs)")
    p.add_argument("--checkpoint", help="DINOv2 checkpoint (convert.load_dinov2); else random")
    p.add_argument("--arch", default="vits14", help="random backbone architecture (ARCHS name)")
    p.add_argument("--seed", type=int, default=0, help="random backbone / LoRA init seed")
    p.add_argument("--methods", default="recyclelora,soma,lora", help="comma-separated inits")
    p.add_argument("--layers", default="", help="regex of adapted layers (default: all linear)")
    p.add_argument("--r-main", type=int, default=32, help="main adapter rank")
    p.add_argument("--r-sub", type=int, default=4, help="sub adapter rank")
    p.add_argument("--rank", type=int, default=16, help="rank of single-adapter methods")
    p.add_argument("--alpha", type=float, default=1.0, help="alpha of main/sub methods")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="alpha of single adapters")
    p.add_argument("--heatmap-layer", default="blocks_0/attn/qkv", help="layer of the heatmaps")
    p.add_argument(
        "--trained",
        type=Path,
        help="trained adapted backbone (model_io.save_tree safetensors), analysed against "
        "the --trained-method init of the same backbone",
    )
    p.add_argument("--trained-method", default="recyclelora", help="init of the trained tree")
    p.add_argument("--cache-dir", help="cache of initialised layers (peft.params.attach)")
    p.add_argument(
        "--run",
        type=Path,
        help="a training workdir: with --image, draw what each of its adapters changes in the "
        "backbone's features (PCA of the difference with / without the adapter)",
    )
    p.add_argument("--image", type=Path, help="RGB image for the --run feature-change figures")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.run or args.image:
        if not (args.run and args.image):
            raise SystemExit("--run and --image go together")
        summary = {"feature_change": feature_change_figures(args.run, args.image, args.out)}
        (args.out / "feature_change.json").write_text(json.dumps(summary, indent=1))
        for name, ratios in summary["feature_change"].items():
            print(f"{name}: PCs 1-3 explain {', '.join(f'{100 * r:.1f}' for r in ratios)} %")
        return summary
    arch, backbone, source = _backbone(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.trained and args.trained_method not in methods:
        methods.append(args.trained_method)
    results, inits = {}, {}
    for method in methods:
        params, layout = attach(
            backbone, arch, [_rule(method, args)], seed=args.seed, cache_dir=args.cache_dir
        )
        inits[method] = (params, layout)
        results[method] = adapter_stats(params, layout)
        plot_similarity(
            params, layout, args.heatmap_layer, f"{method} init", args.out / f"sim_{method}.png"
        )
    summary: dict[str, Any] = {"backbone": source, "arch": str(arch), "init": results}
    if args.trained:
        init_params, layout = inits[args.trained_method]
        trained, _ = load_tree(args.trained)
        summary["trained"] = adapter_stats(trained, layout)
        ratios = column_norm_ratios(trained, init_params, layout)
        summary["trained"]["init_column_norm_ratio"] = {
            "layers": ratios,
            "mean": float(np.mean(list(ratios.values()))) if ratios else None,
        }
        plot_similarity(
            trained, layout, args.heatmap_layer, "trained", args.out / "sim_trained.png"
        )
        results = {**results, "trained": summary["trained"]}
    plot_grassmann(results, args.out / "grassmann.png")
    (args.out / "summary.json").write_text(json.dumps(_finite(summary), indent=1))
    for method, stats in results.items():
        print(method)
        for kind, names in stats["by_type"].items():
            cells = ", ".join(
                f"{n} eff.rank {s['effective_rank']:.2f} ({s['rank_efficiency']:.3f})"
                for n, s in names.items()
            )
            print(f"  {kind:>5}: {cells}")
    return summary


if __name__ == "__main__":
    main()
