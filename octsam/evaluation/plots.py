"""Figures for OCT segmentation results: overlays, metric bars, qualitative grid, training curves, confusion matrix.

Every plotting function takes data, writes one PNG and returns its path. Figures are built on
``matplotlib.figure.Figure`` (rendered by the Agg canvas), never through ``pyplot``, so nothing depends on or changes
the global backend and nothing is left open. Class colours and the overlay blend come from ``octsam.colors``, the one
colour scheme of every output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.patches import Patch

from octsam.colors import as_rgb_uint8, overlay, rgb01
from octsam.data.contract import IGNORE_INDEX
from octsam.errors import OctSamError

# Okabe-Ito colour-blind-safe palette for methods (kept apart from the class colours).
METHOD_COLORS = ("#999999", "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#000000")

__all__ = [
    "add_legend",
    "choose_cases",
    "legend_handles",
    "plot_confusion_matrix",
    "plot_metric_bars",
    "plot_qualitative_grid",
    "plot_training_curves",
]


def legend_handles(labels: Sequence[str], include_background: bool = False, ignore: bool = False) -> list[Patch]:
    """Colour patches for a legend: one per class (index 0 only with ``include_background``), plus 'ignored'."""
    start = 0 if include_background else 1
    handles = [
        Patch(facecolor=rgb01(i, labels), edgecolor="black", linewidth=0.5, label=str(name))
        for i, name in enumerate(labels)
        if i >= start
    ]
    if ignore:
        handles.append(Patch(facecolor=rgb01(IGNORE_INDEX), edgecolor="black", linewidth=0.5, label="ignored"))
    return handles


def add_legend(target: Figure | Axes, labels: Sequence[str], include_background: bool = False, **kwargs: Any) -> Any:
    """Add the class-colour legend to a figure or axes; ``kwargs`` go to ``legend``."""
    kwargs.setdefault("frameon", False)
    return target.legend(handles=legend_handles(labels, include_background), **kwargs)


def _new_figure(figsize: tuple[float, float], dpi: int) -> Figure:
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)  # render with Agg whatever the global backend is
    return fig


def _fit_width(fig: Figure, text: str, fontsize: float, fraction: float = 0.96) -> str:
    """``text`` with line breaks between words so that no line is wider than ``fraction`` of the figure at
    ``fontsize`` (a figure-level title is clipped, not shrunk, by the figure edges). Lines that fit are unchanged."""
    renderer = fig.canvas.get_renderer()
    prop = FontProperties(size=fontsize)
    limit = fig.get_figwidth() * fig.dpi * fraction

    def width(line: str) -> float:
        return renderer.get_text_width_height_descent(line, prop, ismath=False)[0]

    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and width(candidate) > limit:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return "\n".join(lines)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi, facecolor="white")  # no bbox "tight": the pixel size is figsize x dpi
    return path


# ----------------------------------------------------------------------------------------------------------------
# Metric bars
# ----------------------------------------------------------------------------------------------------------------


def _bar_table(result: Any, metric: str) -> pd.DataFrame:
    """(class_name, value, low, high) rows from an EvaluationResult (adds the foreground mean) or a DataFrame."""
    per_class = result if isinstance(result, pd.DataFrame) else result.per_class
    needed = ["class_name", f"{metric}_mean"]
    missing = [c for c in needed if c not in per_class.columns]
    if missing:
        raise OctSamError(f"per-class table lacks columns {missing}; pass EvaluationResult or its per_class table")
    table = pd.DataFrame(
        {
            "class_name": per_class["class_name"].astype(str),
            "value": per_class[f"{metric}_mean"].astype(float),
            "low": per_class.get(f"{metric}_ci_low", per_class[f"{metric}_mean"]).astype(float),
            "high": per_class.get(f"{metric}_ci_high", per_class[f"{metric}_mean"]).astype(float),
        }
    )
    headline = getattr(result, "headline", None)
    if headline is not None and len(table) > 1:
        low, high = result.headline_ci.get(f"mean_{metric}", (np.nan, np.nan))
        mean_row = {"class_name": "mean (foreground)", "value": headline[f"mean_{metric}"], "low": low, "high": high}
        table = pd.concat([table, pd.DataFrame([mean_row])], ignore_index=True)
    return table


def plot_metric_bars(
    results: Mapping[str, Any],
    path: str | Path,
    metrics: Sequence[str] = ("iou", "dice"),
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 150,
) -> Path:
    """Grouped bars of per-class IoU/Dice (per-image means) per method with CI error bars.

    ``results`` maps method name -> ``EvaluationResult`` (adds a 'mean (foreground)' group from the headline) or
    its ``per_class`` DataFrame (columns ``class_name``, ``{metric}_mean``, ``{metric}_ci_low/high``). The title
    wraps and the legend takes fewer columns where the figure is too narrow for them (one class, one method).
    """
    if not results:
        raise OctSamError("plot_metric_bars: no results given")
    tables = {m: {metric: _bar_table(r, metric) for metric in metrics} for m, r in results.items()}
    groups = list(dict.fromkeys(name for t in tables.values() for name in t[metrics[0]]["class_name"]))
    n_methods = len(tables)
    if figsize is None:
        width = min(20.0, max(5.5, 1.6 + len(groups) * (0.35 * n_methods + 0.5)))
        figsize = (width, 3.4 * len(metrics) + 0.6)
    fig = _new_figure(figsize, dpi)
    axes = fig.subplots(len(metrics), 1, squeeze=False)[:, 0]
    bar_width = 0.8 / n_methods
    x = np.arange(len(groups))
    for ax, metric in zip(axes, metrics, strict=True):
        for j, (method, by_metric) in enumerate(tables.items()):
            table = by_metric[metric].set_index("class_name").reindex(groups)
            values = table["value"].to_numpy(dtype=float)
            low = np.nan_to_num(values - table["low"].to_numpy(dtype=float), nan=0.0).clip(min=0)
            high = np.nan_to_num(table["high"].to_numpy(dtype=float) - values, nan=0.0).clip(min=0)
            pos = x - 0.4 + bar_width * (j + 0.5)
            color = METHOD_COLORS[j % len(METHOD_COLORS)]
            bars = ax.bar(pos, np.nan_to_num(values), bar_width * 0.92, color=color, label=method, zorder=2)
            ax.errorbar(pos, np.nan_to_num(values), yerr=[low, high], fmt="none", ecolor="black", elinewidth=1.0,
                        capsize=3, zorder=3)  # fmt: skip
            for bar, value, top in zip(bars, values, high, strict=True):
                text = "n/a" if not np.isfinite(value) else f"{value:.2f}"
                ax.text(bar.get_x() + bar.get_width() / 2, np.nan_to_num(value) + top + 0.015, text, ha="center",
                        va="bottom", fontsize=7, rotation=90 if n_methods * len(groups) > 12 else 0)  # fmt: skip
        ax.set_xticks(x, groups)
        ax.set_ylim(0, 1.18)
        ax.set_yticks(np.linspace(0, 1, 6))
        name = {"iou": "IoU", "dice": "Dice"}.get(metric, metric)
        ax.set_ylabel(f"{name} (mean over B-scans)")
        ax.grid(axis="y", color="#dddddd", zorder=0)
        ax.spines[["top", "right"]].set_visible(False)
        if len(groups) > 1 and groups[-1] == "mean (foreground)":
            ax.axvline(len(groups) - 1.5, color="#888888", linestyle=":", linewidth=1)
    # A narrow figure (one class) gets fewer legend columns and a wrapped title rather than clipped ones.
    renderer = fig.canvas.get_renderer()
    for ncols in range(min(n_methods, 4), 0, -1):
        legend = fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=ncols,
                            frameon=False, fontsize=9)  # fmt: skip
        if ncols == 1 or legend.get_window_extent(renderer).width <= fig.get_figwidth() * fig.dpi * 0.96:
            break
        legend.remove()
    if not title:
        title = "Per-class segmentation quality (error bars: 95% CI, bootstrap over patients)"
        if "\n" in _fit_width(fig, title, 11):  # too wide for one line: break before the parenthesis
            title = title.replace(" (", "\n(", 1)
    fig.suptitle(_fit_width(fig, title, 11), fontsize=11)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------------------------
# Qualitative grid
# ----------------------------------------------------------------------------------------------------------------


def choose_cases(scores: Sequence[float]) -> dict[str, int]:
    """Indices of the best, median and worst B-scan by a per-image score (NaN scores are skipped)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        raise OctSamError("choose_cases: no scores given")
    finite = np.flatnonzero(np.isfinite(scores))
    if finite.size == 0:  # nothing scored anywhere: fall back to positions
        return {"best": 0, "median": int(scores.size // 2), "worst": int(scores.size - 1)}
    order = finite[np.argsort(scores[finite], kind="stable")]
    return {"best": int(order[-1]), "median": int(order[(order.size - 1) // 2]), "worst": int(order[0])}


def plot_qualitative_grid(
    images: Sequence[np.ndarray],
    references: Sequence[np.ndarray],
    predictions: Mapping[str, Sequence[np.ndarray]],
    labels: Sequence[str],
    path: str | Path,
    cases: Mapping[str, int] | None = None,
    scores: Mapping[str, Sequence[float]] | None = None,
    rank_by: str | None = None,
    scan_ids: Sequence[str] | None = None,
    panel_width: float = 3.2,
    dpi: int = 150,
) -> Path:
    """Rows: chosen cases; columns: B-scan, ground truth, then each method's overlay, with a class legend.

    ``predictions`` maps method -> masks aligned with ``images``. ``scores`` maps method -> per-image score (e.g.
    ``EvaluationResult.image_scores()``), shown on the panels; without ``cases`` the best, median and worst B-scans
    by ``scores[rank_by]`` (default: the last method) are shown.
    """
    n_images = len(images)
    if n_images == 0 or len(references) != n_images:
        raise OctSamError(f"plot_qualitative_grid: got {n_images} images and {len(references)} references")
    for method, masks in predictions.items():
        if len(masks) != n_images:
            raise OctSamError(f"plot_qualitative_grid: method {method!r} has {len(masks)} masks for {n_images} images")
    if cases is None:
        if not scores:
            raise OctSamError("plot_qualitative_grid: give `cases` (name -> image index) or per-image `scores`")
        rank_by = rank_by or list(scores)[-1]
        if rank_by not in scores:
            raise OctSamError(f"rank_by={rank_by!r} is not one of the scored methods {list(scores)}")
        cases = choose_cases(scores[rank_by])
    for name, index in cases.items():
        if not 0 <= int(index) < n_images:
            raise OctSamError(f"case {name!r} points at image {index}, outside 0..{n_images - 1}")

    columns = ["B-scan", "Ground truth", *predictions.keys()]
    first = np.asarray(images[next(iter(cases.values()))])
    aspect = first.shape[0] / first.shape[1]
    # Constrained layout shrinks panels a little (labels, padding); size rows for that to avoid empty bands.
    panel_height = 0.93 * panel_width * aspect
    figsize = (panel_width * len(columns) + 0.4, (panel_height + 0.3) * len(cases) + 1.1)
    fig = _new_figure(figsize, dpi)
    axes = fig.subplots(len(cases), len(columns), squeeze=False)
    for row, (case_name, index) in enumerate(cases.items()):
        index = int(index)
        image = np.asarray(images[index])
        panels = [as_rgb_uint8(image), overlay(image, references[index], labels)]
        panels += [overlay(image, masks[index], labels) for masks in predictions.values()]
        for col, panel in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col], fontsize=10)
            method = columns[col]
            if scores and method in scores:
                value = float(np.asarray(scores[method], dtype=np.float64)[index])
                text = "Dice n/a (class absent)" if not np.isfinite(value) else f"Dice {value:.2f}"
                ax.text(0.02, 0.97, text, transform=ax.transAxes, ha="left", va="top", fontsize=8, color="white",
                        bbox={"facecolor": "black", "alpha": 0.6, "pad": 2, "edgecolor": "none"})  # fmt: skip
        scan = f"\n{scan_ids[index]}" if scan_ids is not None else ""
        axes[row, 0].set_ylabel(f"{case_name}{scan}", fontsize=9)
    fig.legend(handles=legend_handles(labels), loc="outside lower center", ncols=min(len(labels), 6),
               frameon=False, fontsize=9)  # fmt: skip
    if rank_by is not None:
        fig.suptitle(f"Cases chosen by {rank_by} per-image Dice (mean over foreground classes)", fontsize=11)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------------------------
# Training curves
# ----------------------------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def plot_training_curves(
    history: Sequence[Mapping[str, Any]],
    path: str | Path,
    class_names: Sequence[str] | None = None,
    best_key: str = "val_mean_dice",
    figsize: tuple[float, float] = (11.0, 4.0),
    dpi: int = 150,
    title: str | None = None,
) -> Path:
    """Losses (left) and validation Dice/IoU (right) per epoch from a list of per-epoch dicts.

    Keys containing 'loss' go left; keys containing 'dice' or 'iou' go right (list values, e.g.
    ``val_dice_per_class``, become one dashed line per class named by ``class_names``, foreground classes). The best
    epoch by ``best_key`` is marked. ``title`` (optional, e.g. the run's name) goes above both panels, wrapped to the
    figure width; without it the figure has no overall title.
    """
    if not history:
        raise OctSamError("plot_training_curves: the history is empty (no finished epoch)")
    epochs = [float(h.get("epoch", i + 1)) for i, h in enumerate(history)]
    keys = list(dict.fromkeys(k for h in history for k in h))

    def series(key: str) -> np.ndarray:
        return np.array([float(h[key]) if _is_number(h.get(key)) else np.nan for h in history])

    fig = _new_figure(figsize, dpi)
    ax_loss, ax_metric = fig.subplots(1, 2)
    for key in keys:
        if "loss" in key.lower() and any(_is_number(h.get(key)) for h in history):
            ax_loss.plot(epochs, series(key), marker="o", markersize=3, label=key)
    metric_keys = [k for k in keys if any(s in k.lower() for s in ("dice", "iou"))]
    for key in metric_keys:
        values = [h.get(key) for h in history]
        if any(_is_number(v) for v in values):
            ax_metric.plot(epochs, series(key), marker="o", markersize=3, linewidth=2, label=key)
        elif any(isinstance(v, (list, tuple, np.ndarray)) for v in values):
            width = max(len(v) for v in values if isinstance(v, (list, tuple, np.ndarray)))
            for c in range(width):
                column = [float(v[c]) if isinstance(v, (list, tuple, np.ndarray)) and c < len(v) else np.nan
                          for v in values]  # fmt: skip
                name = class_names[c + 1] if class_names is not None and c + 1 < len(class_names) else f"class {c + 1}"
                if not np.isfinite(column).any():
                    name += " (no data)"
                ax_metric.plot(epochs, column, linestyle="--", linewidth=1.2, marker=".", markersize=4,
                               color=rgb01(c + 1, class_names), label=f"{key}: {name}")  # fmt: skip
    if best_key in keys and np.isfinite(series(best_key)).any():
        values = series(best_key)
        best = int(np.nanargmax(values))
        ax_metric.axvline(epochs[best], color="#555555", linestyle=":", linewidth=1)
        right_half = epochs[best] > (epochs[0] + epochs[-1]) / 2
        ax_metric.annotate(f"best epoch {epochs[best]:g}\n{best_key} {values[best]:.3f}", (epochs[best], values[best]),
                           xytext=(-8 if right_half else 8, -32), textcoords="offset points", fontsize=8,
                           ha="right" if right_half else "left",
                           bbox={"facecolor": "white", "edgecolor": "#999999", "alpha": 0.9, "pad": 2})  # fmt: skip
        ax_metric.plot([epochs[best]], [values[best]], marker="*", markersize=12, color="black", linestyle="none")
    ax_loss.set_title("Loss")
    ax_metric.set_title("Validation metrics")
    ax_metric.set_ylim(0, 1.02)
    for ax in (ax_loss, ax_metric):
        ax.set_xlabel("epoch")
        ax.grid(color="#e5e5e5")
        ax.spines[["top", "right"]].set_visible(False)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, framealpha=0.85, edgecolor="none")
    if len(epochs) <= 20:
        for ax in (ax_loss, ax_metric):
            ax.set_xticks(epochs)
    if title:
        fig.suptitle(_fit_width(fig, title, 11), fontsize=11)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------------------------
# Confusion matrix
# ----------------------------------------------------------------------------------------------------------------


def _count_text(count: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= scale:
            return f"{count / scale:.1f}{suffix}"
    return f"{int(count)}"


def plot_confusion_matrix(
    confusion: np.ndarray,
    labels: Sequence[str],
    path: str | Path,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 150,
) -> Path:
    """Row-normalised per-pixel class confusion (rows: ground truth, columns: prediction), with pixel counts."""
    confusion = np.asarray(confusion, dtype=np.float64)
    n = len(labels)
    if confusion.shape != (n, n):
        raise OctSamError(f"confusion matrix shape {confusion.shape} does not match {n} labels")
    rows = confusion.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(rows > 0, confusion / np.where(rows > 0, rows, 1.0), np.nan)
    if figsize is None:
        side = max(4.2, 1.3 * n + 2.2)
        figsize = (side + 1.0, side)
    fig = _new_figure(figsize, dpi)
    ax = fig.subplots()
    image = ax.imshow(np.nan_to_num(norm), cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")  # layout sizes cells
    fontsize = 10 if n <= 6 else 7
    for i in range(n):
        for j in range(n):
            if np.isnan(norm[i, j]):
                text, color = "n/a", "black"
            else:
                text = f"{100 * norm[i, j]:.1f}%\n({_count_text(confusion[i, j])} px)"
                color = "white" if norm[i, j] > 0.55 else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=fontsize, color=color)
    tilt = max(len(str(s)) for s in labels) > 8
    ax.set_xticks(range(n), labels, rotation=30 if tilt else 0, ha="right" if tilt else "center")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("Prediction")
    ax.set_ylabel("Ground truth")
    ax.set_title(title or "Pixel confusion (row-normalised)", fontsize=11)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of ground-truth pixels")
    return _save(fig, path)
