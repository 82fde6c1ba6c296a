"""Generic PNG plots (line curves, labelled curves with their own x, contour + surface, scatter, bars).

Figures are drawn on an Agg canvas directly, without pyplot, so plotting never depends on (or
changes) the process-wide matplotlib backend and works on machines without a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plots are written as PNG; got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def line_plot(path, x: Sequence[float], series: Mapping[str, Sequence[float]], *, xlabel: str = "",
              ylabel: str = "", title: str = "", hlines: Mapping[str, float] | None = None,
              markers: bool = True) -> Path:
    """One line per named series over shared x; hlines: labelled horizontal reference lines."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for name, ys in series.items():
        ax.plot(x, [np.nan if y is None else y for y in ys], marker="o" if markers else None,
                markersize=3, label=name)
    for name, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", color="grey", linewidth=1, label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if series or hlines:
        ax.legend(fontsize=8)
    return _save(fig, path)


def curves_plot(path, curves: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[str]]], *,
                xlabel: str = "", ylabel: str = "", title: str = "",
                errors: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None) -> Path:
    """One line per named curve, each with its own points (xs, ys) and a text label per point
    (e.g. a trade-off frontier: every point one setting of a knob); `errors`: per curve the
    (x, y) error bar half-widths of its points (e.g. the sd over seeds)."""
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."), ("v", "-")]
    for i, (name, (xs, ys, labels)) in enumerate(curves.items()):
        # Markers and dashes differ, so that curves lying on top of each other stay visible.
        marker, dash = styles[i % len(styles)]
        line, = ax.plot(xs, ys, marker=marker, linestyle=dash, markersize=6 - i % 3, label=name)
        if errors and name in errors:
            ax.errorbar(xs, ys, xerr=errors[name][0], yerr=errors[name][1], fmt="none",
                        ecolor=line.get_color(), elinewidth=0.8, capsize=2, alpha=0.7)
        for x, y, text in zip(xs, ys, labels):
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6,
                        color=line.get_color())
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    return _save(fig, path)


def contour_plot(path, x: Sequence[float], y: Sequence[float], z, *, xlabel: str = "", ylabel: str = "",
                 title: str = "", levels: int = 20, surface: bool = True) -> Path:
    """z[i, j] at (x[i], y[j]): filled contour, and a 3-D surface beside it when `surface`."""
    z = np.asarray(z, dtype=float)
    gx, gy = np.meshgrid(np.asarray(x, dtype=float), np.asarray(y, dtype=float), indexing="ij")
    fig = Figure(figsize=(11 if surface else 5.5, 4.5))
    ax = fig.add_subplot(1, 2 if surface else 1, 1)
    filled = ax.contourf(gx, gy, z, levels=levels, cmap="viridis")
    ax.contour(gx, gy, z, levels=levels, colors="k", linewidths=0.3)
    fig.colorbar(filled, ax=ax)
    ax.plot([0], [0], marker="*", color="red")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if surface:
        ax3 = fig.add_subplot(1, 2, 2, projection="3d")
        ax3.plot_surface(gx, gy, z, cmap="viridis", linewidth=0)
        ax3.set(xlabel=xlabel, ylabel=ylabel)
    return _save(fig, path)


def scatter_plot(path, x: Sequence[float], y: Sequence[float], *, xlabel: str = "", ylabel: str = "",
                 title: str = "", diagonal: bool = False) -> Path:
    """Points (x, y); `diagonal` adds the y = x line (agreement of two measurements)."""
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.scatter(x, y, s=10, alpha=0.7)
    if diagonal and len(x):
        lo, hi = float(min(min(x), min(y))), float(max(max(x), max(y)))
        ax.plot([lo, hi], [lo, hi], linestyle="--", color="grey", linewidth=1)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def bar_plot(path, categories: Sequence[str], series: Mapping[str, Sequence[float]], *,
             ylabel: str = "", title: str = "") -> Path:
    """Grouped bars: one group per category, one bar per named series."""
    fig = Figure(figsize=(max(5, 1.2 * len(categories) * max(1, len(series)) / 2), 4))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(series))
    pos = np.arange(len(categories))
    for k, (name, values) in enumerate(series.items()):
        ax.bar(pos + (k - (len(series) - 1) / 2) * width, [np.nan if v is None else v for v in values],
               width, label=name)
    ax.set_xticks(pos, list(categories), rotation=20, ha="right")
    ax.set(ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return _save(fig, path)
