"""The pure part of gathering a report's inputs: run tables from store rows and artifacts.

``jobs.report`` reads the store (runs frame, CSV and counts artifacts); these functions
shape what it read into the tables :class:`analysis.report.ReportInputs` holds.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from analysis.keys import RunKeys
from analysis.report import RUN_KEYS


def metrics_of(row: pd.Series) -> dict[str, float]:
    """``metrics.<name>`` columns of a runs_frame row -> {name: value}, system metrics dropped."""
    out = {}
    for col, value in row.items():
        name = str(col).removeprefix("metrics.")
        if str(col).startswith("metrics.") and not name.startswith("system/") and pd.notna(value):
            out[name] = float(value)
    return out


def run_keys(member: RunKeys) -> dict[str, object]:
    """The :data:`analysis.report.RUN_KEYS` of a run."""
    return {"run_id": member.run_id, "method": member.method, "calib_lang": member.calib_lang,
            "calib_set": member.calib_set}


def runs_table(members: Sequence[RunKeys], frame: pd.DataFrame) -> pd.DataFrame:
    """One row per member: run keys and its metrics (flat names) from the runs frame."""
    by_id = {r["run_id"]: r for _, r in frame.iterrows()}
    rows = [{**run_keys(m), **metrics_of(by_id[m.run_id])} for m in members]
    table = pd.DataFrame(rows)
    metric_cols = sorted(c for c in table.columns if c not in RUN_KEYS)
    return table[RUN_KEYS + metric_cols]


def stack_member_tables(
    tables: Sequence[tuple[RunKeys, pd.DataFrame]]
) -> pd.DataFrame | None:
    """Per-run tables concatenated, each with its run keys prepended; None when none."""
    parts = [table.assign(**run_keys(m))[RUN_KEYS + list(table.columns)] for m, table in tables]
    return pd.concat(parts, ignore_index=True) if parts else None


def iou_matrix(table: pd.DataFrame) -> pd.DataFrame:
    """A ``matrix_<method>.csv`` as read back: the language x language IoU matrix."""
    matrix = table.set_index("lang_a").astype(float)
    matrix.index = matrix.index.astype(str)
    matrix.index.name, matrix.columns.name = "lang_a", "lang_b"
    return matrix
