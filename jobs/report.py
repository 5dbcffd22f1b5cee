"""The ``report`` job: read a sweep from the MLflow store and build the paper-style report.

Reads only the store (no model): the members' params and metrics, their analysis tables,
LAPE counts and per-document / per-window evaluation records, the parent's IoU matrices
and dense LAPE counts, and the dense baseline's metrics and records.
:func:`analysis.report.build_report` turns them into files under
``report_dir/<sweep_run_id>/``, which are also logged to the sweep parent run under
``report/``. The same store gives byte-identical files.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import report_tables as RI
from analysis.lape import counts_file_scores
from analysis.mask_iou import iou_groups
from analysis.report import ReportInputs, build_report
from pipeline.config import Config, split_list
from pipeline.errors import LangpruneError
from pipeline.paths import check_writable
from tracking import params as P
from tracking import runs as R
from tracking import runs_table as RT
from tracking.logging import PPL_WINDOWS_ARTIFACT, TASK_DOCS_ARTIFACT

log = logging.getLogger(__name__)


def member_tables(sweep: RT.Sweep, path: str) -> pd.DataFrame | None:
    """A per-run analysis table of every member that has it, with the run keys prepended."""
    tables = [(m, t) for m in sweep.members
              if (t := RT.read_csv_artifact(m.run_id, path)) is not None]
    return RI.stack_member_tables(tables)


DOC_COLUMNS = ["task", "lang", "doc_id", "correct", "n_choices"]  # loglik lists not needed
WINDOW_COLUMNS = ["lang", "window", "nll_sum", "n_tokens", "n_bytes"]


def _records(run_id: str, path: str, columns: Sequence[str]) -> pd.DataFrame | None:
    """One run's per-document or per-window records (None for runs from older code)."""
    table = RT.read_parquet_artifact(run_id, path) if run_id else None
    if table is None:
        return None
    return table[[c for c in columns if c in table.columns]]


def member_records(sweep: RT.Sweep, path: str, columns: Sequence[str]) -> pd.DataFrame | None:
    """Every member's records of ``path`` stacked with its run keys; None when none has them."""
    tables = [(m, t) for m in sweep.members if (t := _records(m.run_id, path, columns)) is not None]
    return RI.stack_member_tables(tables)


def _lape_scores(run_id: str, path: str, dst: Path) -> np.ndarray | None:
    local = RT.download_artifact(run_id, path, dst / run_id)
    if local is None:
        return None
    return counts_file_scores(local).numpy().reshape(-1)


def iou_inputs(sweep: RT.Sweep, names: Sequence[str]
               ) -> tuple[dict[str, pd.DataFrame], pd.DataFrame | None]:
    """The parent's IoU matrices (language x language, per IoU group ``names``: a method, or
    a method at one sparsity) and intra/inter summary."""
    matrices = {}
    for method in sorted(set(names)):
        table = RT.read_csv_artifact(sweep.run_id, f"{RT.IOU_DIR}/matrix_{method}.csv")
        if table is not None:
            matrices[method] = RI.iou_matrix(table)
    return matrices, RT.read_csv_artifact(sweep.run_id, f"{RT.IOU_DIR}/summary.csv")


def read_inputs(sweep: RT.Sweep, workdir: Path) -> ReportInputs:
    """Everything :func:`analysis.report.build_report` needs, from the store alone."""
    frame = RT.runs_frame(parent_run_id=sweep.run_id)
    dense_rows = frame[frame["run_id"] == sweep.dense_run]
    dense = RI.metrics_of(dense_rows.iloc[0]) if len(dense_rows) else {}
    scores = {}
    if (dense_scores := _lape_scores(sweep.run_id, RT.DENSE_LAPE_COUNTS, workdir)) is not None:
        scores["dense"] = dense_scores
    for m in sweep.members:
        if (run_scores := _lape_scores(m.run_id, RT.LAPE_COUNTS, workdir)) is not None:
            scores[m.run_id] = run_scores
    names, group_sparsity = iou_groups(sweep.members)
    iou, iou_summary = iou_inputs(sweep, list(names.values()))
    return ReportInputs(
        sweep_run=sweep.run_id,
        runs=RI.runs_table(sweep.members, frame),
        dense=dense,
        eval_langs=split_list(sweep.params.get("eval_langs", "")),
        tasks=split_list(sweep.params.get("tasks", "")),
        sparsity={**{m.method: float(m.params.get("sparsity", "nan")) for m in sweep.members},
                  **group_sparsity},  # by method and by IoU group
        iou=iou,
        iou_summary=iou_summary,
        snr=member_tables(sweep, RT.SNR_TABLE),
        lsar=member_tables(sweep, RT.LSAR_TABLE),
        lape=member_tables(sweep, RT.LAPE_TABLE),
        lape_scores=scores,
        task_docs=member_records(sweep, TASK_DOCS_ARTIFACT, DOC_COLUMNS),
        ppl_windows=member_records(sweep, PPL_WINDOWS_ARTIFACT, WINDOW_COLUMNS),
        dense_docs=_records(sweep.dense_run, TASK_DOCS_ARTIFACT, DOC_COLUMNS),
        dense_windows=_records(sweep.dense_run, PPL_WINDOWS_ARTIFACT, WINDOW_COLUMNS),
    )


def _writable_folder(folder: Path) -> None:
    check_writable(folder, "report_dir")


def _replace_folder(built: Path, target: Path) -> None:
    """Swap the freshly built report in for an older one (no stale files survive)."""
    if target.exists():
        shutil.rmtree(target)
    shutil.move(str(built), str(target))


def _log_files(parent: R.TrackedRun, files: Sequence[Path]) -> None:
    for path in files:
        parent.log_artifact(path, RT.REPORT_DIR)


def run_report(cfg: Config) -> Path:
    """Build the report of a sweep (``sweep_run`` or the newest finished one).

    Returns:
        The report folder ``report_dir/<sweep_run_id>``.

    Raises:
        LangpruneError: no sweep, no members, or an unwritable ``report_dir``.
    """
    R.check_tracking_reachable()
    exp_id = R.experiment_id(cfg.run.experiment)
    sweep = RT.load_sweep(RT.find_sweep(exp_id, cfg.analysis.sweep_run))
    if not sweep.members:
        raise LangpruneError(f"sweep {sweep.run_id} has no successful member runs")
    root = Path(cfg.analysis.report_dir)
    _writable_folder(root)
    target = root / sweep.run_id
    tags = {P.TAG_KIND: "report", P.TAG_STATE: "running", RT.TAG_SWEEP: sweep.run_id}
    # the run `mlflow run -e report` made, if any
    wrapper = R.take_over_launched_run(f"report-{sweep.run_id[:8]}", tags)
    with (R.run_guard(wrapper) if wrapper else contextlib.nullcontext()):
        with tempfile.TemporaryDirectory(prefix=".report-", dir=root) as tmp:
            inputs = read_inputs(sweep, Path(tmp) / "inputs")
            built = Path(tmp) / "report"
            build_report(inputs, built)
            _replace_folder(built, target)
        files = sorted(p for p in target.iterdir() if p.is_file())
        _log_files(R.TrackedRun(sweep.run_id), files)
        if wrapper is not None:
            wrapper.log_artifact(target / "summary.md", RT.REPORT_DIR)
            wrapper.finish()
    print(f"report of sweep {sweep.run_id}: {len(files)} files in {target}")
    return target
