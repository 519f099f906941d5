"""Figures for ``results.md``: metric-vs-knob curves with seed CIs, and real-vs-generated grids.

Everything renders with the Agg backend (no display on a training box) and is written
atomically (``datamodules.io.atomic_write``) so a reader never sees half a PNG.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from datamodules.io import atomic_write  # noqa: E402
from experiments.reporting.stats import summarize  # noqa: E402

Points = List[Tuple[float, Dict[str, float]]]  # (x, summarize(...)) sorted by x


def _save(fig: Any, path: Path) -> Path:
    path = atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"), fsync=False)
    plt.close(fig)
    return path


def points_by_x(x_values: Sequence[Any], y_values: Sequence[Any]) -> Points:
    """Group per-run ``y`` by numeric ``x`` and summarize each group over seeds.

    Non-numeric or missing ``x`` entries are skipped (a plot axis must be ordered).
    """
    groups: Dict[float, list] = {}
    for x, y in zip(x_values, y_values):
        try:
            xf = float(x)
        except (TypeError, ValueError):
            continue
        if np.isfinite(xf):
            groups.setdefault(xf, []).append(y)
    return [(x, summarize(groups[x])) for x in sorted(groups)]


def _errorbar(ax: Any, points: Points, color: str, label: str, marker: str = "o") -> None:
    xs = np.array([p[0] for p in points])
    means = np.array([p[1]["mean"] for p in points])
    low = np.array([p[1]["ci95_low"] for p in points])
    high = np.array([p[1]["ci95_high"] for p in points])
    # Single-seed points have no CI: draw them without a bar rather than with a fake zero bar.
    yerr = np.vstack([np.nan_to_num(means - low), np.nan_to_num(high - means)])
    ax.errorbar(xs, means, yerr=yerr, color=color, marker=marker, capsize=3, label=label)


def line_plot(points: Points, path: Path, x_label: str, y_label: str, title: str = "") -> Path:
    """Mean ± 95 % CI of one metric against one knob (e.g. Dice vs augmentation ratio)."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    _errorbar(ax, points, "tab:blue", y_label)
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"{y_label} (mean, 95 % CI)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def twin_plot(left: Points, right: Points, path: Path, x_label: str, left_label: str,
              right_label: str, title: str = "") -> Path:
    """Two metrics on twin y axes against one knob (e.g. accept rate and Dice vs θ)."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    _errorbar(ax, left, "tab:orange", left_label, marker="s")
    ax.set_xlabel(x_label)
    ax.set_ylabel(left_label, color="tab:orange")
    ax2 = ax.twinx()
    _errorbar(ax2, right, "tab:blue", right_label)
    ax2.set_ylabel(f"{right_label} (mean, 95 % CI)", color="tab:blue")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def budget_plot(series: Dict[str, Points], path: Path, x_label: str, y_label: str, title: str = "") -> Path:
    """Mean ± 95 % CI of one metric against the label budget on a log axis, one line per arm.

    Args:
        series: arm label -> points ``(budget, summarize(...))`` sorted by budget.
        path: PNG to write.
    """
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, points) in enumerate(series.items()):
        if points:
            _errorbar(ax, points, colors[i % len(colors)], label, marker="os^vD"[i % 5])
    budgets = sorted({p[0] for points in series.values() for p in points})
    ax.set_xscale("log")
    ax.set_xticks(budgets)
    ax.set_xticklabels([f"{b:g}" for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel(f"{x_label} (log scale)")
    ax.set_ylabel(f"{y_label} (mean, 95 % CI)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_from_spec(plot: Dict[str, Any], columns: Dict[str, Sequence[Any]], path: Path,
                   title: str = "", labels: Optional[Dict[str, str]] = None) -> Optional[Path]:
    """Draw the figure a table YAML declares.

    Args:
        plot: ``{kind: line, x: KEY, y: METRIC}`` or ``{kind: twin, x: KEY, y: [M1, M2]}``.
        columns: key or metric name -> per-run values (same length, one entry per run).
        path: PNG to write.
        title: figure title.
        labels: key or metric -> axis label (e.g. ``test/dice`` -> ``Dice``).

    Returns:
        The PNG path, or None when there is nothing numeric to draw.

    Raises:
        ValueError: unknown ``kind`` or wrong number of ``y`` metrics.
    """
    kind, x = plot.get("kind", "line"), plot["x"]
    ys = plot["y"] if isinstance(plot["y"], (list, tuple)) else [plot["y"]]
    if kind not in ("line", "twin") or len(ys) != (1 if kind == "line" else 2):
        raise ValueError(f"plot {plot}: use kind line with one y metric, or twin with two.")
    x_values = columns.get(x, [])
    series = [points_by_x(x_values, columns.get(y, [None] * len(x_values))) for y in ys]
    if not all(series):
        return None
    name = lambda key: (labels or {}).get(key, key.split(".")[-1] if key.startswith("axis.") else key)  # noqa: E731
    if kind == "line":
        return line_plot(series[0], path, name(x), name(ys[0]), title)
    return twin_plot(series[0], series[1], path, name(x), name(ys[0]), name(ys[1]), title)
