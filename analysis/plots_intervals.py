"""Report figures with uncertainty and sparsity: scores with error bars, scores vs sparsity.

Same conventions as :mod:`analysis.plots` (a fresh Agg figure under the default style, a PNG
without version metadata), so the same inputs give byte-identical files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from analysis.plots import _figure, _finite, _save

Triple = tuple[float, float, float]  # value, low, high


def _yerr(points: Sequence[Triple]) -> tuple[np.ndarray, np.ndarray]:
    """Value and non-negative [below, above] error lengths (0 where the interval is unknown)."""
    v, lo, hi = (_finite([p[k] for p in points]) for k in range(3))
    below, above = np.nan_to_num(v - lo, nan=0.0), np.nan_to_num(hi - v, nan=0.0)
    return v, np.vstack([np.maximum(below, 0.0), np.maximum(above, 0.0)])


def error_bars(
    series: Mapping[str, Sequence[Triple]],
    labels: Sequence[str],
    path: str | Path,
    *,
    reference: Sequence[Triple] | None = None,
    reference_label: str = "dense",
    ylabel: str = "",
    title: str = "",
) -> Path:
    """One marker series per calibration row over evaluation languages, with 95% intervals.

    Args:
        series: Calibration row -> (value, low, high) per evaluation language.
        labels: The evaluation languages (x axis).
        path: PNG to write.
        reference: The dense run's (value, low, high) per language, drawn as black bars.
        reference_label: Legend entry of the reference.
        ylabel: y-axis label.
        title: Figure title.

    Returns:
        ``path``.
    """
    n = max(1, len(series) + (reference is not None))
    width = 0.8 / n
    x = np.arange(len(labels), dtype=float)
    with _figure(1.6 + 0.9 * max(3, len(labels)), 3.6) as fig:
        ax = fig.subplots()
        for k, (row, points) in enumerate(series.items()):
            v, err = _yerr(points)
            ax.errorbar(x - 0.4 + width * (k + 0.5), v, yerr=err, fmt="o", markersize=4,
                        capsize=2, linewidth=1, label=str(row))
        if reference is not None:
            v, err = _yerr(reference)
            ax.errorbar(x + 0.4 - width / 2, v, yerr=err, fmt="s", color="black", markersize=4,
                        capsize=2, linewidth=1, label=reference_label)
        ax.set_xticks(x, [str(c) for c in labels])
        ax.set_xlabel("evaluation language")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        if series:
            ax.legend(fontsize=7, ncol=2 if n > 6 else 1, title="calibration", title_fontsize=7)
        return _save(fig, path)


def sparsity_lines(
    panels: Mapping[str, Mapping[str, Mapping[float, float]]],
    path: str | Path,
    *,
    reference: Mapping[str, float] | None = None,
    intervals: Mapping[str, Mapping[str, Mapping[float, tuple[float, float]]]] | None = None,
    title: str = "",
) -> Path:
    """One panel per metric: score against sparsity, one line per calibration row.

    Args:
        panels: Metric (panel title) -> calibration row -> sparsity -> value.
        path: PNG to write.
        reference: Metric -> the dense value, drawn as a dashed horizontal line.
        intervals: Like ``panels`` with ``(low, high)``: drawn as error bars on the points.
        title: Figure title.

    Returns:
        ``path``.
    """
    names = list(panels)
    with _figure(3.4 * max(1, len(names)), 3.4) as fig:
        axes = np.atleast_1d(fig.subplots(1, max(1, len(names)), squeeze=False)[0])
        for ax, name in zip(axes, names):
            rows = list(panels[name].items())
            span = max((max(p) - min(p) for _, p in rows if p), default=0.0) or 1.0
            for i, (row, points) in enumerate(rows):
                xs = sorted(points)
                ys = _finite([points[s] for s in xs])
                line = ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=str(row))
                bands = (intervals or {}).get(name, {}).get(row, {})
                if bands:  # dodged sideways a little so the rows' bars do not hide each other
                    lows = _finite([bands.get(s, (np.nan, np.nan))[0] for s in xs])
                    highs = _finite([bands.get(s, (np.nan, np.nan))[1] for s in xs])
                    dodge = (i - (len(rows) - 1) / 2) * 0.012 * span
                    ax.errorbar(np.asarray(xs) + dodge, ys,
                                yerr=[np.maximum(ys - lows, 0), np.maximum(highs - ys, 0)],
                                fmt="none", ecolor=line[0].get_color(), elinewidth=0.8, capsize=2)
            if reference and name in reference:
                ax.axhline(reference[name], color="black", linestyle="--", linewidth=1,
                           label="dense")
            ax.set_xlabel("sparsity")
            ax.set_title(name, fontsize=9)
            ax.grid(alpha=0.3)
        if names:
            axes[0].legend(fontsize=7, title="calibration", title_fontsize=7)
        fig.suptitle(title, fontsize=10)
        return _save(fig, path)
