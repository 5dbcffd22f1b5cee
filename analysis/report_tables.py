"""The report's inputs and the tables over them: pure functions over DataFrames.

:class:`ReportInputs` holds everything the report shows; ``jobs.report`` fills it from the
store with the shaping functions here (:func:`runs_table`, :func:`stack_member_tables`,
:func:`iou_matrix`). Conventions: ``runs`` has one row per pruned run with columns
``run_id``, ``method``, ``calib_lang``, ``calib_set`` and one column per metric (``ppl.de``,
``sib200.de``, ...). A calibration x evaluation matrix averages a calibration language's
runs over its calibration sets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.keys import RunKeys
from analysis.snr import snr_from_sums

FLOAT_FORMAT = "%.6g"
RUN_KEYS = ["run_id", "method", "calib_lang", "calib_set"]


@dataclass
class ReportInputs:
    """Everything the report shows, already read from the store.

    Attributes:
        sweep_run: The sweep parent run id.
        runs: One row per pruned run (see the module docstring).
        dense: The dense baseline's metrics (``ppl.de`` -> value); empty if unknown.
        eval_langs: Evaluation languages in config order.
        tasks: Task suites (metrics ``<task>.<lang>``).
        sparsity: Method (and IoU group, e.g. ``wanda_s0.5``) -> target sparsity (for the
            random IoU baseline).
        iou: Method -> language x language IoU matrix (intra on the diagonal).
        iou_summary: Per method ``intra``, ``inter``, ``n_intra``, ``n_inter``.
        snr: Rows of every run's SNR table plus :data:`RUN_KEYS`.
        lsar: Rows of every run's LSAR table plus :data:`RUN_KEYS`.
        lape: Rows of every run's LAPE table plus :data:`RUN_KEYS`.
        lape_scores: ``"dense"`` or a run id -> LAPE score of every FFN neuron.
        task_docs: Rows of every run's ``eval/task_docs.parquet`` (task, lang, doc_id,
            correct, n_choices, ...) plus :data:`RUN_KEYS`; None when no run logged them.
        ppl_windows: Rows of every run's ``eval/ppl_windows.parquet`` (lang, window, nll_sum,
            n_tokens, n_bytes) plus :data:`RUN_KEYS`; None when no run logged them.
        dense_docs: The dense run's task documents (no run keys); None if not logged.
        dense_windows: The dense run's perplexity windows; None if not logged.
    """

    sweep_run: str
    runs: pd.DataFrame
    dense: Mapping[str, float] = field(default_factory=dict)
    eval_langs: Sequence[str] = ()
    tasks: Sequence[str] = ()
    sparsity: Mapping[str, float] = field(default_factory=dict)
    iou: Mapping[str, pd.DataFrame] = field(default_factory=dict)
    iou_summary: pd.DataFrame | None = None
    snr: pd.DataFrame | None = None
    lsar: pd.DataFrame | None = None
    lape: pd.DataFrame | None = None
    lape_scores: Mapping[str, np.ndarray] = field(default_factory=dict)
    task_docs: pd.DataFrame | None = None
    ppl_windows: pd.DataFrame | None = None
    dense_docs: pd.DataFrame | None = None
    dense_windows: pd.DataFrame | None = None


@dataclass(frozen=True)
class Group:
    """The runs of one matrix: a method at one sparsity.

    Attributes:
        method: The pruning method.
        sparsity: The target sparsity, or None when the method has a single one.
        suffix: File-name suffix, ``""`` or e.g. ``"_s0.5"``.
        name: ``method`` + ``suffix``, e.g. ``wanda_s0.5``.
        label: Human-readable, e.g. ``wanda`` or ``wanda, sparsity 0.5``.
    """

    method: str
    sparsity: float | None = None

    @property
    def suffix(self) -> str:
        return "" if self.sparsity is None else f"_s{self.sparsity:g}"

    @property
    def name(self) -> str:
        """The group in file and metric names: ``wanda`` or ``wanda_s0.5``."""
        return f"{self.method}{self.suffix}"

    @property
    def label(self) -> str:
        if self.sparsity is None:
            return self.method
        return f"{self.method}, sparsity {self.sparsity:g}"

    def rows(self, runs: pd.DataFrame) -> pd.DataFrame:
        """The runs of this group."""
        rows = runs[runs["method"] == self.method]
        if self.sparsity is not None:
            rows = rows[rows["sparsity"] == self.sparsity]
        return rows


@dataclass(frozen=True)
class Finding:
    """Whether target-language calibration is best for one evaluation language.

    Attributes:
        eval_lang: The evaluation (= target) language.
        target: The target-calibrated value.
        best_lang: The best calibration language (the target itself when it ties).
        best: The best value.
        target_best: True when the target's value is the best (ties included).
        tied: True when the target is best but another calibration language equals it.
        other_lang: The best calibration language other than the target ("" if none).
        other: Its value (NaN if none).
    """

    eval_lang: str
    target: float
    best_lang: str
    best: float
    target_best: bool
    tied: bool = False
    other_lang: str = ""
    other: float = math.nan


# ---- tables ----------------------------------------------------------------------------------


def write_csv(frame: pd.DataFrame, path: Path, index: bool = False) -> Path:
    """CSV with a fixed float format and ``\\n`` line ends (byte-stable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=index, float_format=FLOAT_FORMAT, lineterminator="\n")
    return path


def methods(runs: pd.DataFrame) -> list[str]:
    """The pruning methods of the runs, sorted."""
    return sorted(set(runs["method"]))


def groups(runs: pd.DataFrame) -> list[Group]:
    """One :class:`Group` per method, or per method and sparsity where a method has several."""
    out = []
    for method in methods(runs):
        rows = runs[runs["method"] == method]
        values = sorted(set(rows["sparsity"].dropna())) if "sparsity" in rows else []
        out += [Group(method, float(v)) for v in values] if len(values) > 1 else [Group(method)]
    return out


def analysis_groups(table: pd.DataFrame, runs: pd.DataFrame) -> list[tuple[Group, pd.DataFrame]]:
    """The rows of a per-run analysis table (run keys first) split like the matrices: per
    method, or per method and sparsity on a grid, so a figure never pools 20% and 50%
    masks. The ``method`` column is kept; groups without rows are left out."""
    out = []
    for group in groups(runs):
        part = table[table["run_id"].isin(set(group.rows(runs)["run_id"]))]
        if len(part):
            out.append((group, part))
    return out


def metric_matrix(
    runs: pd.DataFrame, method: str | Group, prefix: str, langs: Sequence[str]
) -> pd.DataFrame:
    """Calibration x evaluation matrix of metric ``<prefix>.<lang>`` for one method (group).

    Rows are calibration rows (``zh``, ``de+en``; sorted), columns ``langs``; a cell is the
    mean over the calibration sets of that row (NaN where no run logged the metric).
    """
    rows = (method if isinstance(method, Group) else Group(method)).rows(runs)
    cols = [f"{prefix}.{lang}" for lang in langs]
    frame = pd.DataFrame(index=sorted(set(rows["calib_lang"])), columns=list(langs), dtype=float)
    for calib, group in rows.groupby("calib_lang", sort=True):
        for lang, col in zip(langs, cols):
            values = pd.to_numeric(group[col], errors="coerce") if col in group else pd.Series()
            frame.loc[calib, lang] = float(values.mean()) if values.notna().any() else math.nan
    frame.index.name, frame.columns.name = "calibration language", "evaluation language"
    return frame


def dense_reference(
    dense: Mapping[str, float], prefix: str, langs: Sequence[str]
) -> dict[str, float]:
    """The dense baseline's ``<prefix>.<lang>`` values (languages it logged)."""
    return {lang: float(dense[f"{prefix}.{lang}"]) for lang in langs if f"{prefix}.{lang}" in dense}


def has_metric(runs: pd.DataFrame, prefix: str, langs: Sequence[str]) -> bool:
    """True if some run logged ``<prefix>.<lang>`` for one of ``langs``."""
    cols = [f"{prefix}.{lang}" for lang in langs if f"{prefix}.{lang}" in runs]
    return any(pd.to_numeric(runs[c], errors="coerce").notna().any() for c in cols)


def target_findings(matrix: pd.DataFrame, better: str) -> list[Finding]:
    """For each evaluation language with a same-language calibration row: is it the best?"""
    out = []
    for lang in matrix.columns:
        if lang not in matrix.index or math.isnan(matrix.loc[lang, lang]):
            continue
        column = matrix[lang].dropna()
        best_value = column.min() if better == "min" else column.max()
        target = float(matrix.loc[lang, lang])
        target_best = target == best_value
        best_lang = lang if target_best else str(column.idxmin() if better == "min"
                                                  else column.idxmax())
        tied = target_best and int((column == best_value).sum()) > 1
        others = column.drop(lang)
        other_lang = "" if others.empty else str(
            others.idxmin() if better == "min" else others.idxmax())
        other = float(others[other_lang]) if other_lang else math.nan
        out.append(Finding(str(lang), target, best_lang, float(best_value), target_best, tied,
                           other_lang, other))
    return out


def snr_layer_series(snr: pd.DataFrame, method: str, kind: str) -> dict[str, list[float]]:
    """Calibration language -> SNR per layer, sums pooled over evaluation languages and sets."""
    rows = snr[(snr["method"] == method) & (snr["kind"] == kind)]
    sums = rows.groupby(["calib_lang", "layer"], sort=True)[["signal", "noise"]].sum()
    out: dict[str, list[float]] = {}
    for calib, group in sums.groupby(level="calib_lang", sort=True):
        group = group.sort_index()
        out[str(calib)] = [snr_from_sums(s, n) for s, n in zip(group["signal"], group["noise"])]
    return out


def _with_keys(frame: pd.DataFrame | None, sort: Sequence[str]) -> pd.DataFrame | None:
    if frame is None or frame.empty:
        return None
    return frame.sort_values(list(sort), kind="stable").reset_index(drop=True)


def normalise(inputs: ReportInputs) -> ReportInputs:
    """Sort every table so that row order never depends on the store's order."""
    keys = ["method", "sparsity", "calib_lang", "calib_set", "run_id"]
    runs = inputs.runs.sort_values([k for k in keys if k in inputs.runs],
                                   kind="stable").reset_index(drop=True)
    snr = _with_keys(inputs.snr, ["method", "calib_lang", "calib_set", "run_id", "kind",
                                  "eval_lang", "layer"])
    lsar = _with_keys(inputs.lsar, ["method", "calib_lang", "calib_set", "run_id", "eval_lang",
                                    "layer"])
    lape = _with_keys(inputs.lape, ["method", "calib_lang", "calib_set", "run_id", "lang"])
    return replace(
        inputs, runs=runs, dense=dict(inputs.dense), eval_langs=list(inputs.eval_langs),
        tasks=list(inputs.tasks), sparsity=dict(inputs.sparsity), iou=dict(inputs.iou),
        snr=snr, lsar=lsar, lape=lape, lape_scores=dict(inputs.lape_scores),
        task_docs=_with_keys(inputs.task_docs, ["run_id", "task", "lang", "doc_id"]),
        ppl_windows=_with_keys(inputs.ppl_windows, ["run_id", "lang", "window"]))


# ---- from the store's rows and artifacts -----------------------------------------------------


def metrics_of(row: pd.Series) -> dict[str, float]:
    """``metrics.<name>`` columns of a runs_frame row -> {name: value}, system metrics dropped."""
    out = {}
    for col, value in row.items():
        name = str(col).removeprefix("metrics.")
        if str(col).startswith("metrics.") and not name.startswith("system/") and pd.notna(value):
            out[name] = float(value)
    return out


def run_keys(member: RunKeys) -> dict[str, object]:
    """The :data:`RUN_KEYS` of a run."""
    return {"run_id": member.run_id, "method": member.method, "calib_lang": member.calib_lang,
            "calib_set": member.calib_set}


def runs_table(members: Sequence[RunKeys], frame: pd.DataFrame) -> pd.DataFrame:
    """One row per member: run keys, ``sparsity`` and its metrics (flat names)."""
    by_id = {r["run_id"]: r for _, r in frame.iterrows()}
    rows = [{**run_keys(m), "sparsity": float(getattr(m, "sparsity", math.nan)),
             **metrics_of(by_id[m.run_id])} for m in members]
    table = pd.DataFrame(rows)
    metric_cols = sorted(c for c in table.columns if c not in RUN_KEYS and c != "sparsity")
    return table[RUN_KEYS + ["sparsity"] + metric_cols]


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
