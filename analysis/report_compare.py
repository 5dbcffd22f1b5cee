"""The report's paired comparisons: every matrix column compared with its target row.

Glue between :class:`analysis.report_tables.ReportInputs` and :mod:`analysis.comparisons`:
computed once per report (bootstraps are seeded, so the same inputs give the same numbers)
and shared by the matrices, the figures and the summary. A metric without records (runs
from older code) has no columns here; the report then shows point estimates only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from analysis import comparisons as C
from analysis.report_tables import Group, ReportInputs, groups

Compared = Mapping[tuple[Group, str], Sequence[C.Column]]  # (group, metric) -> columns
CELL_NOTE = "cells: value [95% interval]\nhatched: indistinguishable from the target row"


def _records(inputs: ReportInputs, metric: str) -> tuple[pd.DataFrame | None,
                                                         pd.DataFrame | None]:
    if metric == "ppl":
        return inputs.ppl_windows, inputs.dense_windows
    docs = inputs.task_docs
    if docs is None or not (docs["task"] == metric).any():
        return None, inputs.dense_docs
    return docs, inputs.dense_docs


def compare_report(inputs: ReportInputs) -> dict[tuple[Group, str], list[C.Column]]:
    """Per group and metric (``ppl`` and each task with records): one column per language."""
    out: dict[tuple[Group, str], list[C.Column]] = {}
    for group in groups(inputs.runs):
        runs = group.rows(inputs.runs)
        for metric in ["ppl", *inputs.tasks]:
            records, dense = _records(inputs, metric)
            if records is None:
                continue
            mine = records[records["run_id"].isin(set(runs["run_id"]))]
            if mine.empty:
                continue
            out[(group, metric)] = [C.column(mine, dense, runs, metric, lang)
                                    for lang in inputs.eval_langs]
    return out


def interval_frame(columns: Sequence[C.Column], matrix: pd.DataFrame) -> pd.DataFrame:
    """Long table: row, language, value, interval, and the verdict against the target row."""
    rows = []
    by_lang = {c.lang: c for c in columns}
    for lang in matrix.columns:
        col = by_lang.get(str(lang))
        for row in matrix.index:
            ival = col.intervals.get(str(row)) if col else None
            pair = col.versus_target.get(str(row)) if col else None
            rows.append({
                "calibration": row, "evaluation": lang, "value": matrix.loc[row, lang],
                "low": ival.low if ival else math.nan, "high": ival.high if ival else math.nan,
                "n": ival.n if ival else 0,
                "target_vs_row": pair.comparison.estimate if pair else math.nan,
                "target_vs_row_low": pair.comparison.low if pair else math.nan,
                "target_vs_row_high": pair.comparison.high if pair else math.nan,
                "verdict_of_target": pair.comparison.verdict if pair else "",
            })
    return pd.DataFrame(rows)


def cell_texts(columns: Sequence[C.Column], matrix: pd.DataFrame, digits: int) -> np.ndarray:
    """Each cell as "value" over "[low, high]" (two lines), "–" where there is no value."""
    frame = interval_frame(columns, matrix)
    out = np.full(matrix.shape, "–", dtype=object)
    for k, r in enumerate(frame.itertuples()):
        i, j = k % len(matrix.index), k // len(matrix.index)
        if math.isnan(r.value):
            continue
        text = f"{r.value:.{digits}f}"
        if not math.isnan(r.low):
            text += f"\n[{r.low:.{digits}f}, {r.high:.{digits}f}]"
        out[i, j] = text
    return out


def indistinguishable(columns: Sequence[C.Column], matrix: pd.DataFrame) -> np.ndarray:
    """True for a cell whose row is indistinguishable from the same column's target row."""
    out = np.zeros(matrix.shape, dtype=bool)
    for col in columns:
        if col.lang not in matrix.columns:
            continue
        j = matrix.columns.get_loc(col.lang)
        for row, pair in col.versus_target.items():
            if row in matrix.index and pair.comparison.verdict == "indistinguishable":
                out[matrix.index.get_loc(row), j] = True
    return out


def error_series(columns: Sequence[C.Column], matrix: pd.DataFrame
                 ) -> dict[str, list[tuple[float, float, float]]]:
    """Calibration row -> (value, low, high) per evaluation language (NaN where missing)."""
    nan3 = (math.nan, math.nan, math.nan)
    by_lang = {c.lang: c for c in columns}
    out: dict[str, list[tuple[float, float, float]]] = {}
    for row in matrix.index:
        values = []
        for lang in matrix.columns:
            col = by_lang.get(str(lang))
            ival = col.intervals.get(str(row)) if col else None
            values.append((ival.value, ival.low, ival.high) if ival else nan3)
        out[str(row)] = values
    return out


def dense_series(columns: Sequence[C.Column], matrix: pd.DataFrame,
                 dense: Mapping[str, float]) -> list[tuple[float, float, float]]:
    """The dense run's (value, low, high) per evaluation language, from records or metrics."""
    by_lang = {c.lang: c for c in columns}
    out = []
    for lang in matrix.columns:
        col = by_lang.get(str(lang))
        ival = col.case.dense if col and col.case else None
        value = dense.get(str(lang), math.nan)
        out.append((ival.value, ival.low, ival.high) if ival else (value, math.nan, math.nan))
    return out


def dense_texts(columns: Sequence[C.Column], matrix: pd.DataFrame,
                dense: Mapping[str, float], digits: int) -> np.ndarray:
    """The dense reference row's cell texts, with its interval where records give one."""
    out = []
    for value, low, high in dense_series(columns, matrix, dense):
        text = "–" if math.isnan(value) else f"{value:.{digits}f}"
        if not math.isnan(value) and not math.isnan(low):
            text += f"\n[{low:.{digits}f}, {high:.{digits}f}]"
        out.append(text)
    return np.array([out], dtype=object)
