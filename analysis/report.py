"""The paper-style report built from tables: matrices, figures, CSVs and the summary.

Pure functions over DataFrames and arrays (no tracking store: :mod:`jobs.report` reads
the store and calls :func:`build_report`). Everything is deterministic: rows and columns are
sorted (:func:`analysis.report_tables.normalise`), CSV floats use one fixed format, figures
come from :mod:`analysis.plots` (fixed style, no metadata), and the summary
(:mod:`analysis.report_summary`) states numbers with fixed precision. The same inputs
therefore give byte-identical files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from analysis import plots
from analysis.report_summary import render_html, render_markdown, summary_blocks
from analysis.report_tables import (
    ReportInputs,
    dense_reference,
    has_metric,
    methods,
    metric_matrix,
    normalise,
    snr_layer_series,
    write_csv,
)


# ---- figures ---------------------------------------------------------------------------------


def _matrix_files(folder: Path, name: str, matrix: pd.DataFrame, title: str, better: str,
                  reference: Mapping[str, float] | None, fmt: str) -> list[Path]:
    csv = matrix.copy()
    if reference:
        csv.loc["dense"] = [reference.get(c, math.nan) for c in csv.columns]
    return [
        write_csv(csv, folder / f"{name}.csv", index=True),
        plots.matrix_heatmap(matrix, folder / f"{name}.png", title=title, better=better,
                             reference=reference or None, fmt=fmt),
    ]


def ppl_and_task_files(inputs: ReportInputs, folder: Path) -> list[Path]:
    """Per method: the perplexity matrix and one matrix per task (best cell starred)."""
    files: list[Path] = []
    langs = list(inputs.eval_langs)
    for method in methods(inputs.runs):
        ppl = metric_matrix(inputs.runs, method, "ppl", langs)
        files += _matrix_files(folder, f"ppl_{method}", ppl, f"perplexity, {method}\n"
                               "lower is better, * best calibration", "min",
                               dense_reference(inputs.dense, "ppl", langs), ".2f")
        for task in inputs.tasks:
            if not has_metric(inputs.runs, task, langs):
                continue
            matrix = metric_matrix(inputs.runs, method, task, langs).dropna(axis=1, how="all")
            files += _matrix_files(folder, f"{task}_{method}", matrix, f"{task}, {method}\n"
                                   "higher is better, * best calibration", "max",
                                   dense_reference(inputs.dense, task, matrix.columns), ".3f")
    return files


def iou_files(inputs: ReportInputs, folder: Path) -> list[Path]:
    """Per method the language x language IoU matrix (CSV) and heatmap with the baseline."""
    files: list[Path] = []
    for method in sorted(inputs.iou):
        matrix = inputs.iou[method]
        files.append(write_csv(matrix, folder / f"iou_{method}.csv", index=True))
        files.append(plots.iou_heatmap(matrix, folder / f"iou_{method}.png",
                                       sparsity=inputs.sparsity.get(method, 0.5),
                                       title=f"mask IoU, {method} (diagonal: intra-language)"))
    return files


def _bars(frame: pd.DataFrame, method: str, value: str) -> pd.DataFrame:
    """Index = evaluation language, columns = calibration language, mean of ``value``."""
    rows = frame[frame["method"] == method]
    table = rows.groupby(["eval_lang", "calib_lang"], sort=True)[value].mean().unstack()
    table.index.name, table.columns.name = "evaluation language", "calibration language"
    return table


def _layer_series(frame: pd.DataFrame, method: str, value: str) -> dict[str, list[float]]:
    """Calibration language -> mean of ``value`` per layer (over evaluation languages)."""
    rows = frame[frame["method"] == method]
    means = rows.groupby(["calib_lang", "layer"], sort=True)[value].mean()
    return {calib: group.sort_index().tolist()
            for calib, group in means.groupby(level="calib_lang", sort=True)}


def lsar_files(inputs: ReportInputs, folder: Path) -> list[Path]:
    """LSAR change per evaluation language coloured by calibration language, and per layer."""
    lsar = inputs.lsar
    if lsar is None:
        return []
    files = [write_csv(lsar, folder / "lsar.csv")]
    for method in sorted(set(lsar["method"])):
        for part in ("agnostic", "specific"):
            files.append(plots.grouped_bars(
                _bars(lsar, method, part), folder / f"lsar_{part}_{method}.png",
                ylabel=f"mean |change| of the {part} part",
                title=f"LSAR {part} change, {method} (mean over layers)"))
            files.append(plots.layer_lines(
                _layer_series(lsar, method, part), folder / f"lsar_{part}_layers_{method}.png",
                ylabel=f"mean |change| of the {part} part",
                title=f"LSAR {part} change per layer, {method} (mean over eval languages)"))
    return files


def lape_files(inputs: ReportInputs, folder: Path) -> list[Path]:
    """LAPE distributions dense vs pruned, overlap and removed fractions per language."""
    lape = inputs.lape
    if lape is None:
        return []
    files = [write_csv(lape, folder / "lape.csv")]
    for method in sorted(set(lape["method"])):
        rows = inputs.runs[inputs.runs["method"] == method].sort_values(["calib_lang", "calib_set"])
        first = rows.drop_duplicates("calib_lang")  # one calibration set per language
        pruned = {r.calib_lang: inputs.lape_scores[r.run_id] for r in first.itertuples()
                  if r.run_id in inputs.lape_scores}
        if "dense" in inputs.lape_scores and pruned:
            files.append(plots.lape_histograms(
                inputs.lape_scores["dense"], pruned, folder / f"lape_hist_{method}.png",
                title=f"LAPE of FFN neurons: dense vs {method} (by calibration language)"))
        removed = _bars(lape.rename(columns={"lang": "eval_lang"}), method, "removed_fraction")
        files.append(plots.grouped_bars(
            removed, folder / f"lape_removed_{method}.png",
            baseline=inputs.sparsity.get(method), baseline_label="sparsity",
            ylabel="weights of the language's specific neurons pruned",
            title=f"LAPE neurons removed by the mask, {method}"))
    return files


def snr_files(inputs: ReportInputs, folder: Path) -> list[Path]:
    """The SNR table and, per method, local and accumulated SNR per layer by calibration."""
    snr = inputs.snr
    if snr is None:
        return []
    files = [write_csv(snr, folder / "snr.csv")]
    for method in sorted(set(snr["method"])):
        for kind in ("local", "accumulated"):
            files.append(plots.layer_lines(
                snr_layer_series(snr, method, kind), folder / f"snr_{kind}_{method}.png",
                ylabel="SNR (dB)", title=f"{kind} SNR of the pruning error per layer, {method}"))
    return files


# ---- everything ------------------------------------------------------------------------------


def build_report(inputs: ReportInputs, folder: str | Path, title: str = "") -> list[Path]:
    """Write every matrix, figure, CSV and the summary into ``folder``.

    Args:
        inputs: What to show (see :class:`ReportInputs`).
        folder: Output folder (created).
        title: Summary title; defaults to one naming the sweep.

    Returns:
        The written files, sorted by name.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    inputs = normalise(inputs)
    files = ppl_and_task_files(inputs, out)
    files += iou_files(inputs, out)
    files += lsar_files(inputs, out) + lape_files(inputs, out) + snr_files(inputs, out)
    files.append(write_csv(inputs.runs, out / "runs.csv"))
    title = title or f"langprune report, sweep {inputs.sweep_run}"
    blocks = summary_blocks(inputs, title)
    existing = {p.name for p in files}
    (out / "summary.md").write_text(render_markdown(blocks, existing), encoding="utf-8")
    (out / "summary.html").write_text(render_html(blocks, existing, title), encoding="utf-8")
    files += [out / "summary.md", out / "summary.html"]
    return sorted(files, key=lambda p: p.name)
