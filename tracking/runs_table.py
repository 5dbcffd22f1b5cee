"""Read runs back from the MLflow store: sweeps, their members, tidy run tables, artifacts.

The read side of :mod:`tracking` for ``analyze`` and ``report``: find a sweep parent run and
its member runs (from ``sweep/members.json``), build one tidy row per run with flat
``params.*`` / ``metrics.*`` / ``tags.*`` columns, and download artifacts (masks, tables) of
a run to a local folder. Also names the artifacts and tags those two commands write, so
readers and writers agree on one spelling. Writing goes through :class:`tracking.runs.TrackedRun`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException

from pipeline.errors import LangpruneError
from tracking import params as P
from tracking import runs as R
from tracking.logging import MASKS_ARTIFACT

log = logging.getLogger(__name__)

MEMBERS_ARTIFACT = "sweep/members.json"
TAG_ANALYSIS = "langprune.analysis"  # "done" once SNR/LSAR/LAPE are logged with the run
TAG_SWEEP = "langprune.sweep_run"  # on analyze/report wrapper runs: the sweep they describe
# Artifacts analyze logs with each member run.
SNR_TABLE = "analysis/snr.csv"
LSAR_TABLE = "analysis/lsar.csv"
LAPE_TABLE = "analysis/lape.csv"
LAPE_COUNTS = "analysis/lape_counts.safetensors"
ANALYSIS_SUMMARY = "analysis/summary.json"
# Artifacts analyze logs with the sweep parent run.
IOU_DIR = "iou"
DENSE_LAPE_COUNTS = "analysis/dense_lape_counts.safetensors"
REPORT_DIR = "report"


@dataclass(frozen=True)
class Member:
    """One member run of a sweep.

    Attributes:
        run_id: The member's run id.
        method: Pruning method (``params.method``).
        calib_lang: Calibration row label (:func:`member_label`: ``zh``, ``de+en``).
        calib_set: Calibration set index.
        params: All params of the run (strings).
        tags: All tags of the run.
        sparsity: Target sparsity (``params.sparsity``; NaN if not logged).
    """

    run_id: str
    method: str
    calib_lang: str
    calib_set: int
    params: Mapping[str, str] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    sparsity: float = math.nan


@dataclass(frozen=True)
class Sweep:
    """A sweep parent run and what it points at.

    Attributes:
        run_id: The parent run id.
        params: The parent's params (model, eval and sweep sections).
        dense_run: Run id of the dense baseline ("" if unknown).
        members: Successful member runs, sorted by (method, calib_lang, calib_set, run_id).
        failed: Member cells that failed during the sweep (their members.json entries).
    """

    run_id: str
    params: Mapping[str, str]
    dense_run: str
    members: tuple[Member, ...]
    failed: tuple[Mapping[str, str], ...] = ()


def find_sweep(exp_id: str, sweep_run: str = "") -> str:
    """The sweep parent run id: ``sweep_run`` (checked) or the newest FINISHED sweep.

    Raises:
        LangpruneError: if the given run is missing or not a sweep, or no finished sweep exists.
    """
    c = R.client()
    if sweep_run:
        try:
            run = c.get_run(sweep_run)
        except MlflowException:
            raise LangpruneError(f"sweep_run {sweep_run!r} does not exist in the store") from None
        if run.data.tags.get(P.TAG_KIND) != "sweep":
            raise LangpruneError(
                f"run {sweep_run} is a {run.data.tags.get(P.TAG_KIND, 'non-langprune')!r} run, "
                "not a sweep parent; pass the id of a run made by `sweep`"
            )
        return sweep_run
    flt = f"tags.`{P.TAG_KIND}` = 'sweep' and attributes.status = 'FINISHED'"
    runs = c.search_runs([exp_id], flt, order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise LangpruneError(
            f"no finished sweep run in experiment {exp_id}; run `sweep` first or pass sweep_run="
        )
    return runs[0].info.run_id


def load_sweep(parent_id: str) -> Sweep:
    """Read a sweep parent and its members (successful cells only) from the store.

    Raises:
        LangpruneError: if the parent has no ``sweep/members.json`` (an unfinished sweep).
    """
    c = R.client()
    parent = c.get_run(parent_id)
    record = read_json_artifact(parent_id, MEMBERS_ARTIFACT)
    if record is None:
        raise LangpruneError(
            f"sweep run {parent_id} has no {MEMBERS_ARTIFACT}: the sweep never finished"
        )
    members, failed = [], []
    for entry in record.get("members", []):
        if entry.get("status") != "ok" or not entry.get("run_id"):
            failed.append(dict(entry))
            continue
        run = c.get_run(entry["run_id"])
        params = dict(run.data.params)
        members.append(
            Member(
                run_id=entry["run_id"],
                method=params.get("method", entry.get("method", "")),
                calib_lang=member_label(entry, params),
                calib_set=int(params.get("calib_set", entry.get("calib_set", "0"))),
                params=params,
                tags=dict(run.data.tags),
                sparsity=_float(params.get("sparsity", entry.get("sparsity", "nan"))),
            )
        )
    members.sort(key=lambda m: (m.method, m.calib_lang, m.calib_set, m.run_id))
    return Sweep(
        run_id=parent_id,
        params=dict(parent.data.params),
        dense_run=str(record.get("dense_run", "")),
        members=tuple(members),
        failed=tuple(failed),
    )


def member_label(entry: Mapping[str, str], params: Mapping[str, str]) -> str:
    """A member's calibration row label, from the resolved blend, never the raw param.

    A run started with ``calib_blend=zh:1`` hashes like ``calib_lang=zh`` and is reused for
    that cell, but its raw ``calib_lang`` param is the default (``en``). The label is, in
    order: the sweep's ``row`` label, the logged resolved label (``calib``), the sweep's
    ``calib_lang`` (the resolved blend label), the raw ``calib_lang`` param (old runs).
    """
    for value in (entry.get("row"), params.get("calib"), entry.get("calib_lang"),
                  params.get("calib_lang")):
        if value:
            return str(value)
    return ""


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _run_row(run: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "status": run.info.status,
    }
    row.update({f"params.{k}": v for k, v in run.data.params.items()})
    row.update({f"metrics.{k}": float(v) for k, v in run.data.metrics.items()})
    row.update({f"tags.{k}": v for k, v in run.data.tags.items()})
    return row


def runs_frame(
    *, experiment_id: str | None = None, parent_run_id: str | None = None
) -> pd.DataFrame:
    """One row per run with flat ``params.*``, ``metrics.*`` (latest value) and ``tags.*`` columns.

    Args:
        experiment_id: Every run of this experiment.
        parent_run_id: A sweep parent: its member runs plus its dense baseline run.

    Returns:
        Rows sorted by ``run_id``, columns sorted after ``run_id``, ``run_name``, ``status``
        (a stable layout: the same store gives the same frame).
    """
    if (experiment_id is None) == (parent_run_id is None):
        raise LangpruneError("runs_frame needs exactly one of experiment_id and parent_run_id")
    c = R.client()
    if experiment_id is not None:
        runs = c.search_runs([experiment_id], max_results=50000)
    else:
        sweep = load_sweep(str(parent_run_id))
        ids = [m.run_id for m in sweep.members] + ([sweep.dense_run] if sweep.dense_run else [])
        runs = [c.get_run(rid) for rid in sorted(set(ids))]
    frame = pd.DataFrame([_run_row(r) for r in runs])
    if frame.empty:
        return pd.DataFrame(columns=["run_id", "run_name", "status"])
    lead = ["run_id", "run_name", "status"]
    frame = frame[lead + sorted(c for c in frame.columns if c not in lead)]
    return frame.sort_values("run_id", kind="stable").reset_index(drop=True)


def list_artifacts(run_id: str, path: str = "") -> list[str]:
    """Artifact paths (files and folders) directly under ``path`` of a run, sorted."""
    return sorted(f.path for f in R.client().list_artifacts(run_id, path or None))


def download_artifact(run_id: str, path: str, dst: str | Path) -> Path | None:
    """Download artifact ``path`` of a run into folder ``dst``; None if the run lacks it."""
    folder, _, name = path.rpartition("/")
    if name not in {p.rpartition("/")[2] for p in list_artifacts(run_id, folder)}:
        return None
    target = Path(dst)
    target.mkdir(parents=True, exist_ok=True)
    with _quiet_downloads():
        return Path(R.client().download_artifacts(run_id, path, str(target)))


@contextmanager
def _quiet_downloads() -> Iterator[None]:
    """No MLflow progress bar per downloaded file (analyze/report fetch hundreds of them)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def download_masks(run_id: str, dst: str | Path) -> Path:
    """Download the bit-packed masks of a pruned run.

    Raises:
        LangpruneError: if the run has no masks artifact.
    """
    path = download_artifact(run_id, MASKS_ARTIFACT, Path(dst) / run_id)
    if path is None:
        raise LangpruneError(f"run {run_id} has no {MASKS_ARTIFACT} artifact")
    return path


def read_json_artifact(run_id: str, path: str) -> Any:
    """A JSON artifact of a run, parsed; None if the run lacks it."""
    with tempfile.TemporaryDirectory() as tmp:
        local = download_artifact(run_id, path, tmp)
        return None if local is None else json.loads(local.read_text(encoding="utf-8"))


def read_parquet_artifact(run_id: str, path: str) -> pd.DataFrame | None:
    """A Parquet artifact of a run as a DataFrame; None if the run lacks it (older runs)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = download_artifact(run_id, path, tmp)
        return None if local is None else pd.read_parquet(local)


def read_csv_artifact(run_id: str, path: str) -> pd.DataFrame | None:
    """A CSV artifact of a run as a DataFrame; None if the run lacks it."""
    with tempfile.TemporaryDirectory() as tmp:
        local = download_artifact(run_id, path, tmp)
        return None if local is None else pd.read_csv(local, keep_default_na=False,
                                                      na_values=["", "NaN", "nan"])
