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
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import plots, plots_intervals
from analysis import report_compare as RC
from analysis.comparisons import Column
from analysis.report_summary import render_html, render_markdown, summary_blocks
from analysis.report_tables import (
    Group,
    ReportInputs,
    analysis_groups,
    dense_reference,
    groups,
    has_metric,
    metric_matrix,
    normalise,
    snr_layer_series,
    write_csv,
)
from analysis.scores import mean_over_parts_interval

# ---- figures ---------------------------------------------------------------------------------


def _matrix_files(folder: Path, name: str, matrix: pd.DataFrame, title: str, better: str,
                  reference: Mapping[str, float] | None, fmt: str,
                  columns: Sequence[Column] = ()) -> list[Path]:
    csv = matrix.copy()
    if reference:
        csv.loc["dense"] = [reference.get(c, math.nan) for c in csv.columns]
    files = [write_csv(csv, folder / f"{name}.csv", index=True)]
    texts = hatched = None
    if columns:  # records: intervals in the cells, indistinguishable cells hatched
        files.append(write_csv(RC.interval_frame(columns, matrix),
                               folder / f"{name}_intervals.csv"))
        texts = RC.cell_texts(columns, matrix, int(fmt[1]))
        if reference:
            texts = np.vstack([texts, RC.dense_texts(columns, matrix, reference, int(fmt[1]))])
        hatched = RC.indistinguishable(columns, matrix)
        title += f"\n{RC.CELL_NOTE}"
    files.append(plots.matrix_heatmap(matrix, folder / f"{name}.png", title=title, better=better,
                                      reference=reference or None, fmt=fmt, texts=texts,
                                      hatched=hatched))
    return files


def _error_bar_file(folder: Path, task: str, group: Group, matrix: pd.DataFrame,
                    columns: Sequence[Column], dense: Mapping[str, float]) -> Path:
    return plots_intervals.error_bars(
        RC.error_series(columns, matrix), [str(c) for c in matrix.columns],
        folder / f"{task}_errorbars_{group.method}{group.suffix}.png",
        reference=RC.dense_series(columns, matrix, dense), ylabel=f"{task} accuracy",
        title=f"{task}, {group.label}\naccuracy with 95% intervals per calibration row")


def ppl_and_task_files(inputs: ReportInputs, folder: Path,
                       compared: RC.Compared | None = None) -> list[Path]:
    """Per method (and sparsity): the perplexity matrix, one matrix per task (best cell
    starred, intervals and hatching where records exist) and per task an error-bar figure."""
    compared = compared if compared is not None else RC.compare_report(inputs)
    files: list[Path] = []
    langs = list(inputs.eval_langs)
    for group in groups(inputs.runs):
        name = group.name
        ppl = metric_matrix(inputs.runs, group, "ppl", langs)
        files += _matrix_files(folder, f"ppl_{name}", ppl, f"perplexity, {group.label}\n"
                               "lower is better, * best calibration", "min",
                               dense_reference(inputs.dense, "ppl", langs), ".2f",
                               compared.get((group, "ppl"), ()))
        for task in inputs.tasks:
            if not has_metric(inputs.runs, task, langs):
                continue
            matrix = metric_matrix(inputs.runs, group, task, langs).dropna(axis=1, how="all")
            dense = dense_reference(inputs.dense, task, matrix.columns)
            columns = compared.get((group, task), ())
            files += _matrix_files(folder, f"{task}_{name}", matrix, f"{task}, {group.label}\n"
                                   "higher is better, * best calibration", "max", dense, ".3f",
                                   columns)
            if columns:
                files.append(_error_bar_file(folder, task, group, matrix, columns, dense))
    return files + sparsity_files(inputs, folder)


def _mean_over_langs(runs: pd.DataFrame, prefix: str, langs: Sequence[str]) -> pd.Series:
    cols = [f"{prefix}.{lang}" for lang in langs if f"{prefix}.{lang}" in runs]
    return runs[cols].apply(pd.to_numeric, errors="coerce").mean(axis=1) if cols else pd.Series()


def sparsity_files(inputs: ReportInputs, folder: Path) -> list[Path]:
    """Per method with several sparsities: each metric (mean over evaluation languages)
    against sparsity, one line per calibration row, the dense value as a reference."""
    files: list[Path] = []
    langs = list(inputs.eval_langs)
    metrics = ["ppl", *[t for t in inputs.tasks if has_metric(inputs.runs, t, langs)]]
    for method in sorted({g.method for g in groups(inputs.runs) if g.sparsity is not None}):
        runs = inputs.runs[inputs.runs["method"] == method]
        panels, reference, bands = {}, {}, {}
        for metric in metrics:
            table = runs.assign(score=_mean_over_langs(runs, metric, langs))
            means = table.groupby(["calib_lang", "sparsity"], sort=True)["score"].mean()
            panels[f"{metric} (mean over eval languages)"] = {
                str(row): {float(s): float(v) for (_, s), v in part.items()}
                for row, part in means.groupby(level="calib_lang", sort=True)}
            bands[f"{metric} (mean over eval languages)"] = _sparsity_bands(
                inputs, runs, metric, langs)
            dense = dense_reference(inputs.dense, metric, langs)
            if dense:
                reference[f"{metric} (mean over eval languages)"] = float(np.mean(list(
                    dense.values())))
        files.append(plots_intervals.sparsity_lines(
            panels, folder / f"sparsity_{method}.png", reference=reference, intervals=bands,
            title=f"{method}: scores against sparsity per calibration row "
                  "(95% bootstrap intervals)"))
    return files


def _sparsity_bands(inputs: ReportInputs, runs: pd.DataFrame, metric: str,
                    langs: Sequence[str]) -> dict[str, dict[float, tuple[float, float]]]:
    """Per calibration row and sparsity: the interval of the mean over evaluation languages
    (and calibration sets), from the runs' perplexity windows or task documents."""
    records = inputs.ppl_windows if metric == "ppl" else inputs.task_docs
    if records is None:
        return {}
    if metric != "ppl":
        records = records[records["task"] == metric]
    out: dict[str, dict[float, tuple[float, float]]] = {}
    for (row, s), cell in runs.groupby(["calib_lang", "sparsity"], sort=True):
        mine = records[records["run_id"].isin(set(cell["run_id"])) & records["lang"].isin(langs)]
        parts = [(g["nll_sum"].to_numpy(), g["n_tokens"].to_numpy()) if metric == "ppl"
                 else g["correct"].to_numpy() for _, g in mine.groupby(["run_id", "lang"])]
        if parts:
            out.setdefault(str(row), {})[float(s)] = mean_over_parts_interval(
                parts, "ppl" if metric == "ppl" else "acc")
    return out


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
    for group, part in analysis_groups(lsar, inputs.runs):
        method, name = group.method, group.name
        for kind in ("agnostic", "specific"):
            files.append(plots.grouped_bars(
                _bars(part, method, kind), folder / f"lsar_{kind}_{name}.png",
                ylabel=f"mean |change| of the {kind} part",
                title=f"LSAR {kind} change, {group.label} (mean over layers)"))
            files.append(plots.layer_lines(
                _layer_series(part, method, kind), folder / f"lsar_{kind}_layers_{name}.png",
                ylabel=f"mean |change| of the {kind} part",
                title=f"LSAR {kind} change per layer, {group.label} (mean over eval languages)"))
    return files


def lape_files(inputs: ReportInputs, folder: Path) -> list[Path]:
    """LAPE distributions dense vs pruned, overlap and removed fractions per language."""
    lape = inputs.lape
    if lape is None:
        return []
    files = [write_csv(lape, folder / "lape.csv")]
    for group, part in analysis_groups(lape, inputs.runs):
        method, name = group.method, group.name
        rows = group.rows(inputs.runs).sort_values(["calib_lang", "calib_set"])
        first = rows.drop_duplicates("calib_lang")  # one calibration set per language
        pruned = {r.calib_lang: inputs.lape_scores[r.run_id] for r in first.itertuples()
                  if r.run_id in inputs.lape_scores}
        if "dense" in inputs.lape_scores and pruned:
            files.append(plots.lape_histograms(
                inputs.lape_scores["dense"], pruned, folder / f"lape_hist_{name}.png",
                title=f"LAPE of FFN neurons: dense vs {group.label} (by calibration language)"))
        removed = _bars(part.rename(columns={"lang": "eval_lang"}), method, "removed_fraction")
        files.append(plots.grouped_bars(
            removed, folder / f"lape_removed_{name}.png",
            baseline=group.sparsity if group.sparsity is not None
            else inputs.sparsity.get(method), baseline_label="sparsity",
            ylabel="weights of the language's specific neurons pruned",
            title=f"LAPE neurons removed by the mask, {group.label}"))
    return files


def snr_files(inputs: ReportInputs, folder: Path) -> list[Path]:
    """The SNR table and, per method, local and accumulated SNR per layer by calibration."""
    snr = inputs.snr
    if snr is None:
        return []
    files = [write_csv(snr, folder / "snr.csv")]
    for group, part in analysis_groups(snr, inputs.runs):
        name = group.name
        for kind in ("local", "accumulated"):
            files.append(plots.layer_lines(
                snr_layer_series(part, group.method, kind), folder / f"snr_{kind}_{name}.png",
                ylabel="SNR (dB)",
                title=f"{kind} SNR of the pruning error per layer, {group.label}"))
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
    compared = RC.compare_report(inputs)
    files = ppl_and_task_files(inputs, out, compared)
    files += iou_files(inputs, out)
    files += lsar_files(inputs, out) + lape_files(inputs, out) + snr_files(inputs, out)
    files.append(write_csv(inputs.runs, out / "runs.csv"))
    title = title or f"langprune report, sweep {inputs.sweep_run}"
    blocks = summary_blocks(inputs, title, compared)
    existing = {p.name for p in files}
    (out / "summary.md").write_text(render_markdown(blocks, existing), encoding="utf-8")
    (out / "summary.html").write_text(render_html(blocks, existing, title), encoding="utf-8")
    files += [out / "summary.md", out / "summary.html"]
    return sorted(files, key=lambda p: p.name)
