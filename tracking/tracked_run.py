"""Logging into one MLflow run by id: :class:`TrackedRun`, the only writer of params,
metrics, tags and artifacts.

Writes go through :class:`mlflow.MlflowClient` with an explicit run id (no fluent global
state). Several search workers write to one parent run, so unique-key conflicts of the SQL
stores are retried (:func:`is_concurrent_insert`); artifact names built from user input are
checked (:func:`safe_artifact_name`), and a full disk becomes one clear error line.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from pipeline.errors import LangpruneError
from tracking import params as P
from tracking import store as S
from tracking.store import _first_line

log = logging.getLogger(__name__)

_BATCH = 900  # MlflowClient.log_batch accepts at most 1000 metrics per call

_CONFLICT_ATTEMPTS = 4
# How SQLite, PostgreSQL and MySQL (through SQLAlchemy) word a unique-key violation.
_CONFLICT_WORDS = ("IntegrityError", "UniqueViolation", "UNIQUE constraint failed",
                   "duplicate key value", "Duplicate entry")


def is_concurrent_insert(e: BaseException) -> bool:
    """Whether an MLflow error is a unique-key conflict with a concurrent writer."""
    text = str(e)
    return any(w in text for w in _CONFLICT_WORDS)


def _retry_conflicts(write: Any, also: Any = lambda e: False) -> None:
    """Call ``write()``; retry it (with a short backoff) when the store reports a unique-key
    conflict with a concurrent writer, or ``also(error)`` holds."""
    for attempt in range(_CONFLICT_ATTEMPTS):
        try:
            write()
            return
        except mlflow.exceptions.MlflowException as e:
            if attempt == _CONFLICT_ATTEMPTS - 1 or not (is_concurrent_insert(e) or also(e)):
                raise
            log.debug("concurrent write to a run; trying again: %s", _first_line(e))
            time.sleep(0.2 * (attempt + 1))


class TrackedRun:
    """Logging for one run id. Only this class writes params/metrics/artifacts."""

    def __init__(self, run_id: str, mlflow_client: MlflowClient | None = None) -> None:
        self.run_id = run_id
        self.client = mlflow_client or S.client()
        self._monitor: Any = None

    # ---- params, tags, metrics ----------------------------------------------------------
    def log_params(self, params: Mapping[str, str]) -> None:
        """Log params; keys already logged (by ``mlflow run`` or another worker) must mean the
        same value.

        Several search workers log the same params to one parent run. MLflow's SQL store reads
        the existing params and then inserts the new ones without retrying, so two workers can
        both insert a key and the slower one fails on the unique key (IntegrityError). That
        conflict is retried here: the params are read again and only the missing ones logged.
        """
        # "Changing param values": another worker's differing value landed between our read
        # and the store's; reading again turns it into our one-line error.
        _retry_conflicts(lambda: self._log_new_params(params),
                         also=lambda e: "Changing param values is not allowed" in str(e))

    def _log_new_params(self, params: Mapping[str, str]) -> None:
        existing = self.client.get_run(self.run_id).data.params
        for k, v in params.items():
            if k in existing and not P.same_param_value(k, existing[k], str(v)):
                raise LangpruneError(
                    f"param {k} was logged as {existing[k]!r} but the run uses {v!r}"
                )
        items = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 90):  # log_batch: at most 100 params per call
            self.client.log_batch(self.run_id, params=items[i : i + 90])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), 90):
            self.client.log_batch(self.run_id, tags=items[i : i + 90])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if _finite_or_inf(v)]
        self._log_metric_items(items)

    def log_step_metrics(self, name: str, values: Mapping[int, float]) -> None:
        """A metric over steps (step = decoder layer index): one point per step."""
        ts = int(time.time() * 1000)
        self._log_metric_items([Metric(name, float(v), ts, int(s)) for s, v in values.items()])

    def _log_metric_items(self, items: list[Metric]) -> None:
        for i in range(0, len(items), _BATCH):
            chunk = items[i : i + _BATCH]
            # Workers logging the same new metric key to one parent can collide on the store's
            # latest-metric row; a metric point is idempotent, so it is logged again.
            _retry_conflicts(lambda chunk=chunk: self.client.log_batch(self.run_id,
                                                                       metrics=chunk))

    # ---- artifacts ----------------------------------------------------------------------
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        name = f"{artifact_path}/{Path(path).name}" if artifact_path else Path(path).name
        with _artifact_errors(self.run_id, name):
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_json(self, obj: Any, name: str) -> None:
        self._log_bytes(json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), name)

    def log_text(self, text: str, name: str) -> None:
        self._log_bytes(text.encode("utf-8"), name)

    def log_table(self, df: pd.DataFrame, name: str) -> None:
        """A table as CSV (readable anywhere) under ``name`` (must end in .csv)."""
        self._log_bytes(df.to_csv(index=False).encode("utf-8"), name)

    def log_parquet(self, df: pd.DataFrame, name: str) -> None:
        """A table as Parquet (types kept, lists of floats included) under ``name``."""
        import io

        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        self._log_bytes(buf.getvalue(), name)

    def _log_bytes(self, data: bytes, name: str) -> None:
        safe = safe_artifact_name(name)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(safe).name
            path.write_bytes(data)
            parent = str(Path(safe).parent)
            with _artifact_errors(self.run_id, safe):
                self.client.log_artifact(self.run_id, str(path),
                                         None if parent == "." else parent)

    def log_dataset(self, df: pd.DataFrame, name: str, source: str, context: str) -> None:
        """Log a data set as an MLflow dataset input, shown in the UI's inputs column."""
        with warnings.catch_warnings():  # schema-inference hints meant for model inputs
            warnings.simplefilter("ignore", UserWarning)
            ds = mlflow.data.from_pandas(df, source=source, name=name)
            entity = ds._to_mlflow_entity()
        tag = InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(entity, [tag])])

    # ---- system metrics -----------------------------------------------------------------
    def start_system_metrics(self) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=5)
        self._monitor.start()

    def stop_system_metrics(self) -> None:
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as e:  # never lose a run over system metrics
                log.warning("system metrics monitor did not stop cleanly: %s", e)
            self._monitor = None

    def finish(self, state: str = "complete", status: str = "FINISHED") -> None:
        self.stop_system_metrics()
        self.set_tags({P.TAG_STATE: state})
        self.client.set_terminated(self.run_id, status)


@contextmanager
def _artifact_errors(run_id: str, name: str) -> Iterator[None]:
    """A full disk or an unwritable artifact location as one clear line (the run then ends
    FAILED through :func:`tracking.runs.run_guard`); MLflow passes the OSError of a local
    store through."""
    try:
        yield
    except OSError as e:
        where = f" at {e.filename}" if e.filename else ""
        raise LangpruneError(f"cannot store artifact {name} of run {run_id}{where}: "
                             f"{e.strerror or _first_line(e)}") from None


def safe_artifact_name(name: str) -> str:
    """An artifact path built from user input that cannot escape its folder.

    Refused: empty names, absolute paths (``/x``, ``C:x``, ``\\\\host``), any ``..`` part,
    backslashes (a separator on Windows and some object stores), NUL and other control
    characters. ``.`` parts and repeated slashes are dropped.
    """
    bad_char = any(ord(c) < 32 or c in "\\\x7f" for c in name)
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if (bad_char or not parts or name.startswith("/") or any(p == ".." for p in parts)
            or re.match(r"^[A-Za-z]:", name)):
        raise LangpruneError(f"unsafe artifact name {name!r}")
    return "/".join(parts)


def _finite_or_inf(v: Any) -> bool:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    return f == f  # NaN is never logged as a result (it would read as a number in the UI)
