"""Report figures people look at: accuracy vs speedup, per-sample cost, kept tokens.

`write_eval_figures` draws the figures of one `trim eval` run; `trim eval report` draws
`plot_pareto`.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas directly (no
pyplot), so they never touch the global backend or a display and are safe to make
from worker processes. Every function writes a PNG to ``path`` (creating its folder)
and returns the path.
"""

from __future__ import annotations

import math
import os
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["pareto_front", "plot_pareto", "plot_cost_histogram", "kept_token_overlay", "plot_kept_tokens",
           "write_eval_figures"]


def _save(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # attaches the Agg canvas to the figure
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def pareto_front(points: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The points no other point beats on both axes, sorted by speedup.

    p is dominated when some q has q.speedup >= p.speedup and q.accuracy >= p.accuracy
    with at least one strict; what is left is the best accuracy available at each speed.
    """
    def dominated(p: Mapping[str, Any]) -> bool:
        return any(
            q["speedup"] >= p["speedup"]
            and q["accuracy"] >= p["accuracy"]
            and (q["speedup"] > p["speedup"] or q["accuracy"] > p["accuracy"])
            for q in points
        )

    return sorted((p for p in points if not dominated(p)), key=lambda p: (p["speedup"], -p["accuracy"]))


def plot_pareto(
    points: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    title: str = "Accuracy vs measured speedup",
    accuracy_label: str = "accuracy",
) -> Path:
    """Scatter of accuracy against measured wall-clock speedup.

    Args:
        points: dicts with ``name`` (label next to the point), ``speedup`` (full time /
            trimmed time, so the unpruned model sits at 1.0), ``accuracy`` and ``group``
            (method or checkpoint family; one colour and line per group). ``budget_curve``
            marks a group that is one model served at several budgets (``trim eval
            --budget``): drawn dash-dotted with square markers, apart from models trained
            per target.
        path: PNG to write.

    The dashed black line is the Pareto front across all groups (``pareto_front``).
    """
    if not points:
        raise ValueError("plot_pareto needs at least one point")
    for p in points:
        missing = {"name", "speedup", "accuracy"} - set(p)
        if missing:
            raise ValueError(f"point {p!r} lacks {sorted(missing)}; each needs name, speedup, accuracy (and group)")

    fig = Figure(figsize=(7, 5))
    ax = fig.add_subplot()
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for p in points:
        groups.setdefault(str(p.get("group", "")), []).append(p)
    for group, members in groups.items():
        members = sorted(members, key=lambda p: p["speedup"])
        xs = [p["speedup"] for p in members]
        ys = [p["accuracy"] for p in members]
        curve = any(p.get("budget_curve") for p in members)
        ax.plot(xs, ys, marker="s" if curve else "o", linestyle="-." if curve else "-", linewidth=1, alpha=0.85,
                label=group or None)
        for p in members:
            # A budget curve's legend names its model: its points need only their budget.
            label = f"@{p['budget']:g}" if curve and p.get("budget") is not None else str(p["name"])
            ax.annotate(label, (p["speedup"], p["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = pareto_front(points)
    if len(front) > 1:
        # Staircase of what is attainable: asking for a speedup between two front points
        # gets the accuracy of the faster one, so each level reaches back to the previous x.
        ax.step([p["speedup"] for p in front], [p["accuracy"] for p in front], where="pre",
                color="black", linestyle="--", linewidth=1, label="Pareto front")
    ax.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")  # the unpruned model
    ax.set_xlabel("measured speedup (x, wall clock, full / trimmed)")
    ax.set_ylabel(accuracy_label)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if any(groups) or len(front) > 1:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_cost_histogram(
    costs: Sequence[float] | np.ndarray,
    path: str | os.PathLike,
    title: str = "Per-sample cost",
    difficulty: Sequence[float] | np.ndarray | None = None,
    difficulty_label: str = "difficulty (e.g. loss of the full model)",
    cost_label: str = "cost (fraction of full FLOPs)",
    bins: int = 30,
) -> Path:
    """Histogram of per-sample cost, with mean and median marked.

    With ``difficulty`` (one value per sample, larger = harder) a second panel plots cost
    against difficulty with the binned mean and the Spearman rank correlation in the
    title: a positive rho means the model spends more on harder inputs.
    """
    costs = np.asarray(costs, dtype=np.float64).ravel()
    if costs.size == 0:
        raise ValueError("plot_cost_histogram needs at least one cost")
    fig = Figure(figsize=(11 if difficulty is not None else 6, 4.2))
    ax = fig.add_subplot(1, 2 if difficulty is not None else 1, 1)
    ax.hist(costs, bins=bins, color="tab:blue", alpha=0.8)
    ax.axvline(costs.mean(), color="tab:red", label=f"mean {costs.mean():.3f}")
    ax.axvline(float(np.median(costs)), color="tab:orange", linestyle="--", label=f"median {np.median(costs):.3f}")
    ax.set_xlabel(cost_label)
    ax.set_ylabel("samples")
    ax.set_title(f"{title} (n={costs.size})")
    ax.legend(fontsize=8)

    if difficulty is not None:
        from scipy.stats import spearmanr

        difficulty = np.asarray(difficulty, dtype=np.float64).ravel()
        if difficulty.shape != costs.shape:
            raise ValueError(f"difficulty has {difficulty.size} values but costs has {costs.size}; give one per sample")
        ax2 = fig.add_subplot(1, 2, 2)
        ax2.scatter(difficulty, costs, s=8, alpha=0.5)
        # Binned means by difficulty quantile show the trend without the scatter's noise.
        edges = np.unique(np.quantile(difficulty, np.linspace(0, 1, 11)))
        if len(edges) > 2:
            which = np.clip(np.searchsorted(edges, difficulty, side="right") - 1, 0, len(edges) - 2)
            centers = [difficulty[which == i].mean() for i in range(len(edges) - 1) if np.any(which == i)]
            means = [costs[which == i].mean() for i in range(len(edges) - 1) if np.any(which == i)]
            ax2.plot(centers, means, color="tab:red", marker="o", label="binned mean")
            ax2.legend(fontsize=8)
        rho = spearmanr(difficulty, costs).statistic if costs.size > 2 else float("nan")
        ax2.set_xlabel(difficulty_label)
        ax2.set_ylabel(cost_label)
        ax2.set_title(f"cost vs difficulty (Spearman rho = {rho:.2f})")
        ax2.grid(True, alpha=0.3)
    return _save(fig, path)


def _as_float_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(f"image must be (H, W, 3) (or (H, W) grey), got {image.shape}; permute a CHW tensor first")
    is_integer = np.issubdtype(image.dtype, np.integer)
    image = image[..., :3].astype(np.float64)
    # uint8 (or float in 0..255) -> 0..1; float already in 0..1 stays.
    if is_integer or image.max() > 1.0:
        image = image / 255.0
    return np.clip(image, 0.0, 1.0)


def kept_token_overlay(image: np.ndarray, keep_mask: np.ndarray, dim: float = 0.25) -> np.ndarray:
    """The image as float RGB in [0, 1] with the pixels of dropped patches scaled by
    ``dim``; kept patches are unchanged. ``keep_mask`` is bool (gh, gw) over the patch
    grid; pixel (y, x) belongs to patch (floor(y * gh / H), floor(x * gw / W)), which
    also covers image sizes that are not a multiple of the grid."""
    rgb = _as_float_image(image)
    keep = np.asarray(keep_mask, dtype=bool)
    if keep.ndim != 2:
        raise ValueError(f"keep mask must be (gh, gw) over the patch grid, got {keep.shape}; reshape the flat mask")
    h, w = rgb.shape[:2]
    rows = np.arange(h) * keep.shape[0] // h
    cols = np.arange(w) * keep.shape[1] // w
    pixel_keep = keep[rows[:, None], cols[None, :]]
    return np.where(pixel_keep[..., None], rgb, rgb * dim)


def plot_kept_tokens(
    image: np.ndarray,
    keep_masks: Mapping[Any, np.ndarray],
    path: str | os.PathLike,
    question: str | None = None,
    dim: float = 0.25,
    max_cols: int = 4,
) -> Path:
    """One panel per layer: the image with dropped patches dimmed and the kept count in
    the title, the question (if any) above them all.

    Args:
        image: (H, W, 3) uint8, or float in [0, 1] (or 0..255).
        keep_masks: layer -> bool (gh, gw) over the patch grid (True = kept).
        path: PNG to write.
    """
    if not keep_masks:
        raise ValueError("plot_kept_tokens needs at least one layer's keep mask")
    # Integer layer ids in numeric order (2 before 10), then any named ones.
    layers = sorted(keep_masks, key=lambda k: (0, int(k), "") if isinstance(k, (int, np.integer)) else (1, 0, str(k)))
    n_cols = min(max_cols, len(layers) + 1)
    n_rows = math.ceil((len(layers) + 1) / n_cols)
    fig = Figure(figsize=(3 * n_cols, 3 * n_rows + (0.6 if question else 0)))
    axes = [fig.add_subplot(n_rows, n_cols, i + 1) for i in range(n_rows * n_cols)]
    axes[0].imshow(_as_float_image(image))
    axes[0].set_title("input", fontsize=9)
    for ax, layer in zip(axes[1:], layers):
        keep = np.asarray(keep_masks[layer], dtype=bool)
        ax.imshow(kept_token_overlay(image, keep, dim=dim))
        ax.set_title(f"layer {layer}: {int(keep.sum())}/{keep.size} kept ({100 * keep.mean():.0f}%)", fontsize=9)
    for ax in axes:
        ax.axis("off")
    if question:
        fig.suptitle("\n".join(textwrap.wrap(f"Q: {question}", width=30 * n_cols)), fontsize=10)
    return _save(fig, path)


def _file_part(value: Any) -> str:
    """A sample id as a piece of a file name (ids may hold '/', spaces, ...)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(value))[:80]


def write_eval_figures(
    out_dir: Path,
    stem: str,
    title: str,
    costs: np.ndarray,
    difficulty: np.ndarray | None,
    difficulty_label: str,
    overlays: Sequence[Any],
    per_image_names: bool,
) -> list[str]:
    """The figures of one `trim eval` run; returns the file names written into ``out_dir``.

    ``<stem>_cost_histogram.png`` of each sample's own cost (``costs``: what it kept, the budget
    calibrated; a padded batch runs more), with the cost-vs-difficulty panel when ``difficulty`` is
    given, and one ``<stem>_kept_tokens_<id>[_image<k>].png`` per image of each overlay
    (``id``, ``text``, ``prediction``, ``image`` (images, H, W, 3), ``masks`` image index ->
    layer -> (g, g) bool, as `trim.eval.collect.KeptFigure`). ``per_image_names`` adds the
    ``_image<k>`` suffix (NLVR2's image pairs).
    """
    written = []
    if len(costs):
        path = plot_cost_histogram(costs, out_dir / f"{stem}_cost_histogram.png", title=f"{title}: per-sample cost",
                                   difficulty=difficulty, difficulty_label=difficulty_label or "difficulty",
                                   cost_label="cost ratio (FLOPs the sample kept / full)")
        written.append(path.name)
    for fig in overlays:
        for image_index, masks in sorted(fig.masks.items()):
            suffix = f"_image{image_index}" if per_image_names else ""
            path = plot_kept_tokens(fig.image[image_index], masks,
                                    out_dir / f"{stem}_kept_tokens_{_file_part(fig.id)}{suffix}.png",
                                    question=f"{fig.text}  (predicted: {fig.prediction})")
            written.append(path.name)
    return written
