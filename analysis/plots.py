"""Paper-style report figures: heatmaps, IoU heatmap, per-layer lines, bars, LAPE histograms.

Every function draws on a fresh :class:`matplotlib.figure.Figure` (rendered by Agg; pyplot,
its global figure list and any display are never used), under matplotlib's default style
whatever the user's matplotlibrc says, and writes a PNG at a fixed dpi without the
``Software`` metadata entry. The same inputs therefore give byte-identical files, which the
report relies on to reproduce its outputs from the same tracking store.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import matplotlib.style
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from analysis.iou import random_iou_baseline
from pipeline.errors import LangpruneError

DPI = 120
# No "Software: matplotlib version ..." entry: files stay identical across matplotlib patches.
PNG_METADATA = {"Software": None}
BETTER = ("min", "max")


@contextmanager
def _figure(width: float, height: float) -> Iterator[Figure]:
    """A fresh constrained-layout figure under matplotlib's default style."""
    with matplotlib.style.context("default"):
        yield Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig: Figure, path: str | Path) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, format="png", dpi=DPI, metadata=PNG_METADATA)
    return target


def _finite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Float array with inf/-inf replaced by NaN (matplotlib leaves gaps for NaN)."""
    arr = np.asarray(values, dtype=float)
    return np.where(np.isfinite(arr), arr, np.nan)


def best_cells(matrix: pd.DataFrame, better: str = "min") -> dict[str, str]:
    """Row label of the best cell in every column (first row on ties; all-NaN columns skipped).

    Args:
        matrix: Rows = calibration languages, columns = evaluation languages.
        better: ``"min"`` (e.g. perplexity) or ``"max"`` (e.g. accuracy).

    Returns:
        Column label -> row label of its best value.
    """
    if better not in BETTER:
        raise LangpruneError(f"better must be one of {BETTER}, got {better!r}")
    best = {}
    for col in matrix.columns:
        values = pd.to_numeric(matrix[col], errors="coerce")
        if values.notna().any():
            best[col] = values.idxmin() if better == "min" else values.idxmax()
    return best


def _annotate(ax: Axes, image: AxesImage, values: np.ndarray, fmt: str,
              texts: np.ndarray | None = None) -> None:
    """Write each cell's value (or its given text), white on dark cells, black on light."""
    rgba = np.asarray(image.cmap(image.norm(np.asarray(image.get_array()))))
    for (i, j), value in np.ndenumerate(values):
        text = "–" if math.isnan(value) else format(value, fmt)
        if texts is not None and i < texts.shape[0]:
            text = str(texts[i, j])
        r, g, b = rgba[i, j, :3]
        dark = not math.isnan(value) and 0.299 * r + 0.587 * g + 0.114 * b < 0.5
        ax.text(j, i, text, ha="center", va="center", fontsize=7 if "\n" in text else 8,
                color="white" if dark else "black")


def _hatch(ax: Axes, hatched: np.ndarray) -> None:
    """Grey hatching over the cells marked True."""
    for (i, j), flag in np.ndenumerate(hatched):
        if flag:
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//",
                                   edgecolor="lightgrey", linewidth=0))


def _column_means(matrix: pd.DataFrame) -> np.ndarray:
    """Mean of each column over its finite cells (NaN for a column without any)."""
    values = _finite(matrix.to_numpy(dtype=float))
    counts = np.isfinite(values).sum(axis=0)
    sums = np.nansum(values, axis=0)
    return np.divide(sums, counts, out=np.full(sums.shape, np.nan), where=counts > 0)


def matrix_heatmap(
    matrix: pd.DataFrame,
    path: str | Path,
    *,
    title: str = "",
    better: str | None = "min",
    reference: Mapping[str, float] | None = None,
    reference_label: str = "dense",
    fmt: str = ".2f",
    relative_to_column: bool = True,
    colorbar_label: str = "",
    texts: np.ndarray | None = None,
    hatched: np.ndarray | None = None,
) -> Path:
    """Heatmap of a calibration x evaluation matrix, best cell per column starred.

    Args:
        matrix: Rows = calibration languages, columns = evaluation languages, numeric cells.
        path: PNG to write (folders are created).
        title: Figure title.
        better: ``"min"``/``"max"`` to star the best calibration row per column (better
            cells are drawn brighter); None for no stars. The reference row never gets a star.
        reference: Optional value per column (e.g. the dense model), drawn as an extra row
            below a separator line.
        reference_label: Row label of the reference.
        fmt: Format spec of the cell annotations.
        relative_to_column: Colour by value / column mean over the calibration rows, so
            languages with very different scales share one colour map; otherwise raw values.
        colorbar_label: Colour bar label (a default names the colouring).
        texts: Optional text per matrix cell (e.g. value and interval), replacing ``fmt``.
        hatched: Optional booleans per matrix cell: True cells are drawn hatched.

    Returns:
        ``path``.
    """
    stars = best_cells(matrix, better) if better is not None else {}
    values = matrix.to_numpy(dtype=float)
    rows = [str(r) for r in matrix.index]
    if reference is not None:
        ref = np.array([reference.get(c, np.nan) for c in matrix.columns], dtype=float)
        values = np.vstack([values, ref])
        rows.append(reference_label)
    colors = values / _column_means(matrix) if relative_to_column else values
    n_rows, n_cols = values.shape
    tall = 1.6 if texts is not None else 1.0  # two-line cells need the room
    width = 1.1 + 0.75 * n_cols if texts is None else max(4.2, 1.6 + 1.0 * n_cols)
    with _figure(width,
                 1.0 + 0.45 * tall * n_rows) as fig:
        ax = fig.subplots()
        image = ax.imshow(
            _finite(colors), cmap="viridis_r" if better == "min" else "viridis", aspect="auto"
        )
        _annotate(ax, image, values, fmt, texts)
        if hatched is not None:
            _hatch(ax, hatched)
        for col, row in stars.items():
            ax.scatter(
                [matrix.columns.get_loc(col) + 0.36],
                [matrix.index.get_loc(row) - 0.28],
                marker="*",
                s=70,
                color="red",
                edgecolors="black",
                linewidths=0.5,
            )
        if reference is not None:
            ax.axhline(n_rows - 1.5, color="white", linewidth=3)
        ax.set_xticks(range(n_cols), [str(c) for c in matrix.columns])
        ax.set_yticks(range(n_rows), rows)
        ax.set_xlabel(matrix.columns.name or "evaluation language")
        ax.set_ylabel(matrix.index.name or "calibration language")
        ax.set_title(title, fontsize=10)
        default = "value / column mean" if relative_to_column else "value"
        fig.colorbar(image, ax=ax, label=colorbar_label or default)
        return _save(fig, path)


def iou_heatmap(
    matrix: pd.DataFrame, path: str | Path, *, sparsity: float, title: str = "mask IoU"
) -> Path:
    """Language x language IoU heatmap (intra on the diagonal) with the random baseline.

    The baseline s / (2 - s) is marked on the colour bar (a line and a labelled tick) and
    stated under the title; diagonal cells are outlined.

    Args:
        matrix: Square IoU matrix (e.g. :func:`analysis.iou.language_iou_matrix`).
        path: PNG to write.
        sparsity: The runs' sparsity s, for the baseline.
        title: Figure title.

    Returns:
        ``path``.
    """
    baseline = random_iou_baseline(sparsity)
    values = matrix.to_numpy(dtype=float)
    n_rows, n_cols = values.shape
    with _figure(1.6 + 0.7 * n_cols, 1.2 + 0.55 * n_rows) as fig:
        ax = fig.subplots()
        image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        _annotate(ax, image, values, ".3f")
        for k in range(min(n_rows, n_cols)):
            ax.add_patch(_cell_outline(k))
        ax.set_xticks(range(n_cols), [str(c) for c in matrix.columns])
        ax.set_yticks(range(n_rows), [str(r) for r in matrix.index])
        ax.set_title(
            f"{title}\nrandom masks: s/(2-s) = {baseline:.3f} at s = {sparsity:g}", fontsize=10
        )
        bar = fig.colorbar(image, ax=ax, label="IoU (diagonal: intra-language)")
        bar.ax.axhline(baseline, color="red", linewidth=2)
        ticks = [t for t in (0.0, 0.25, 0.5, 0.75, 1.0) if abs(t - baseline) > 0.06]
        bar.set_ticks(
            sorted([*ticks, baseline]),
            labels=[
                f"random {t:.2f}" if t == baseline else f"{t:g}" for t in sorted([*ticks, baseline])
            ],
        )
        return _save(fig, path)


def _cell_outline(k: int) -> Rectangle:
    return Rectangle((k - 0.5, k - 0.5), 1, 1, fill=False, edgecolor="white", linewidth=1.5)


def layer_lines(
    series: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    baseline: float | None = None,
    baseline_label: str = "baseline",
    xlabel: str = "layer",
    ylabel: str = "",
    title: str = "",
) -> Path:
    """One line per series over layers (x = 0, 1, ...), with an optional horizontal baseline.

    Infinite values (e.g. the SNR of an unpruned layer) are left as gaps.

    Args:
        series: Label -> values per layer, drawn in the given order.
        path: PNG to write.
        baseline: y of a dashed reference line (e.g. the random IoU baseline).
        baseline_label: Legend entry of the baseline.
        xlabel: x-axis label.
        ylabel: y-axis label.
        title: Figure title.

    Returns:
        ``path``.
    """
    with _figure(6.0, 3.6) as fig:
        ax = fig.subplots()
        for label, values in series.items():
            ax.plot(
                range(len(values)),
                _finite(values),
                marker="o",
                markersize=3,
                linewidth=1.2,
                label=str(label),
            )
        if baseline is not None:
            ax.axhline(baseline, color="black", linestyle="--", linewidth=1, label=baseline_label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if series or baseline is not None:
            ax.legend(fontsize=7, ncol=2 if len(series) > 6 else 1)
        return _save(fig, path)


def grouped_bars(
    table: pd.DataFrame,
    path: str | Path,
    *,
    ylabel: str = "",
    title: str = "",
    baseline: float | None = None,
    baseline_label: str = "baseline",
    log: bool = False,
) -> Path:
    """Grouped bar chart: one group per row of ``table``, one coloured bar per column.

    Args:
        table: Index = groups on the x axis (e.g. evaluation languages), columns = series
            (e.g. calibration languages), numeric cells.
        path: PNG to write.
        ylabel: y-axis label.
        title: Figure title.
        baseline: y of a dashed reference line.
        baseline_label: Legend entry of the baseline.
        log: Logarithmic y axis.

    Returns:
        ``path``.
    """
    n_groups, n_series = table.shape
    width = 0.8 / max(n_series, 1)
    x = np.arange(n_groups)
    with _figure(max(4.0, 1.0 + 0.35 * n_groups * max(n_series, 1)), 3.6) as fig:
        ax = fig.subplots()
        for k, col in enumerate(table.columns):
            ax.bar(
                x - 0.4 + width * (k + 0.5),
                _finite(table[col].to_numpy(dtype=float)),
                width,
                label=str(col),
                color=f"C{k % 10}" if n_series <= 10 else None,
            )
        if baseline is not None:
            ax.axhline(baseline, color="black", linestyle="--", linewidth=1, label=baseline_label)
        ax.set_xticks(x, [str(g) for g in table.index])
        ax.set_xlabel(table.index.name or "")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=min(max(n_series, 1), 4), title=table.columns.name)
        return _save(fig, path)


def lape_histograms(
    dense: Sequence[float] | np.ndarray,
    pruned: Mapping[str, Sequence[float] | np.ndarray],
    path: str | Path,
    *,
    bins: int = 50,
    title: str = "LAPE distribution",
    log_counts: bool = True,
) -> Path:
    """Histograms of LAPE scores: the dense model filled, each pruned model as a step line.

    All histograms share bin edges over the pooled finite values (NaN LAPE of never-firing
    neurons is dropped), so the curves compare directly.

    Args:
        dense: LAPE scores of the dense model (any shape; flattened).
        pruned: Label (e.g. calibration language) -> LAPE scores of a pruned model.
        path: PNG to write.
        bins: Number of shared bins.
        title: Figure title.
        log_counts: Logarithmic count axis, so the low-LAPE (language-specific) tail shows.

    Returns:
        ``path``.
    """
    dense_v = _drop_nonfinite(dense)
    pruned_v = {label: _drop_nonfinite(v) for label, v in pruned.items()}
    pooled = np.concatenate([dense_v, *pruned_v.values()])
    if pooled.size == 0:
        raise LangpruneError("no finite LAPE scores to plot")
    edges = np.histogram_bin_edges(pooled, bins=bins).tolist()
    with _figure(6.0, 3.6) as fig:
        ax = fig.subplots()
        ax.hist(dense_v, bins=edges, color="0.75", label="dense")
        for k, (label, values) in enumerate(pruned_v.items()):
            ax.hist(
                values,
                bins=edges,
                histtype="step",
                linewidth=1.2,
                color=f"C{k % 10}",
                label=str(label),
            )
        if log_counts:
            ax.set_yscale("log")
        ax.set_xlabel("LAPE (low = language-specific)")
        ax.set_ylabel("neurons")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
        return _save(fig, path)


def _drop_nonfinite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    arr = np.asarray(values, dtype=float).reshape(-1)
    return arr[np.isfinite(arr)]
