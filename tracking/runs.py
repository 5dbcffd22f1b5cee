"""The life cycle of langprune's MLflow runs: start or attach, reuse, finish, reap stale ones.

Every run is driven through :class:`mlflow.MlflowClient` with an explicit run id (no fluent
global state), so one process can log a dense baseline and a pruned run side by side. A run
counts as a result only when it is FINISHED *and* tagged ``langprune.state=complete``; that
tag is written last, after every param, metric and artifact. Runs that ``mlflow run`` leaves
RUNNING after a failed environment set-up, or whose process died, are never taken as live:
:func:`reap_stale_runs` marks them FAILED.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
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
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from pipeline.errors import LangpruneError
from tracking import params as P

log = logging.getLogger(__name__)

_BATCH = 900  # MlflowClient.log_batch accepts at most 1000 metrics per call
_TAG_CHARS = 500  # langprune.error: enough for one line, short enough for the runs table
# A RUNNING run that never got a langprune pid tag is an environment set-up that died
# (``mlflow run`` creates the run before building the env); after this long it is stale.
STALE_UNSTARTED_S = 3600.0


class Interrupted(BaseException):
    """Raised by the SIGTERM/SIGINT handler so that runs end KILLED, not FAILED."""


def client() -> MlflowClient:
    return MlflowClient()


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def check_tracking_reachable() -> None:
    """Fail fast with one clear line if the tracking store cannot be reached.

    Requests give up after one quick retry here (:func:`quick_http_failure`), so a dead
    URI costs seconds, not MLflow's minutes of backoff.
    """
    from tracking.reliability import quick_http_failure

    uri = tracking_uri()
    try:
        with quick_http_failure():  # the long mid-run retries are not meant for a wrong URI
            client().search_experiments(max_results=1)
    except Exception as e:  # MLflow raises several types for an unreachable store
        if uri.startswith(("http://", "https://")):
            raise LangpruneError(
                f"tracking server {uri} is not reachable ({_connection_reason(e)}); start it, "
                "or point MLFLOW_TRACKING_URI at a running one") from None
        raise LangpruneError(f"cannot open the MLflow tracking store {uri}: {_first_line(e)}"
                             ) from None


def _connection_reason(e: BaseException) -> str:
    """The socket-level reason inside MLflow's wrapped request error ("[Errno 111]
    Connection refused", a timeout, an HTTP status), else its first line."""
    text = str(e)
    errno = re.search(r"\[Errno -?\d+\] [^\"')(]+", text)
    if errno:
        return errno.group(0).strip()
    for word in ("timed out", "Read timed out", "Name or service not known"):
        if word in text:
            return word
    return _first_line(e)


def _first_line(e: BaseException) -> str:
    """The first line of an error's message, whole (the console shows it uncut)."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters at a word boundary, marked with "…"."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    if space > limit // 2:  # a word boundary not too far back
        cut = cut[:space]
    return cut.rstrip(" ,;:") + "…"


def experiment_id(name: str) -> str:
    """The active ``mlflow run`` experiment if we run under it, else ``name`` (created)."""
    env_run = os.environ.get("MLFLOW_RUN_ID")
    if env_run:
        return client().get_run(env_run).info.experiment_id
    env_exp = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if env_exp:
        return env_exp
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=default_artifact_location(name))
    except mlflow.exceptions.MlflowException:  # created concurrently by another worker
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# Set by ``mlflow server`` (--default-artifact-root) for the stores it opens; a client
# has no other setting for where a new experiment's artifacts go.
_SERVER_ARTIFACT_ROOT = "_MLFLOW_SERVER_ARTIFACT_ROOT"


def default_artifact_location(name: str, uri: str | None = None) -> str | None:
    """Where a new experiment's artifacts go: next to a SQLite database file.

    MLflow's client puts them in ``./mlruns`` of the working folder, whatever folder the
    database is in, so a store outside the repository would still fill the repository.
    Here a ``sqlite:///<dir>/<file>`` store keeps them in ``<dir>/mlruns/<name>``. Other
    stores (a server, PostgreSQL), an in-memory SQLite or a configured artifact root: None
    (MLflow decides).
    """
    uri = uri or tracking_uri()
    if not uri.startswith("sqlite:///") or os.environ.get(_SERVER_ARTIFACT_ROOT):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    folder = re.sub(r"[^\w.-]", "_", name) or "experiment"
    return (Path(path).expanduser().resolve().parent / "mlruns" / folder).as_uri()


def active_experiment_name() -> str | None:
    """The experiment ``mlflow run`` (or the environment) put this process in, if any.

    ``MLFLOW_RUN_ID`` (the run ``mlflow run`` created) or ``MLFLOW_EXPERIMENT_ID`` name it
    through the store; ``MLFLOW_EXPERIMENT_NAME`` names it directly. None when none is set
    or the store cannot say quickly (the preflight then reports the store).
    """
    from tracking.reliability import quick_http_failure

    run_id, exp_id = os.environ.get("MLFLOW_RUN_ID"), os.environ.get("MLFLOW_EXPERIMENT_ID")
    if run_id or exp_id:
        try:
            with quick_http_failure():
                c = client()
                if run_id:
                    exp_id = c.get_run(run_id).info.experiment_id
                return c.get_experiment(exp_id).name
        except Exception as e:  # the preflight reports an unreachable store
            log.debug("cannot read the active experiment: %s", _first_line(e))
            return None
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or None


def fail_env_run(command: str, message: str) -> bool:
    """Mark the run ``mlflow run`` created (``MLFLOW_RUN_ID``) as our failed run.

    Called when a command fails before it took that run over: without this the run would
    end FAILED under a random MLflow name with no reason. It gets the name
    ``failed-<command>``, the tags ``langprune.error`` and ``langprune.state=failed``, and
    ends FAILED. Best effort: quick requests, every store error swallowed, so the original
    error is what the user sees.

    Returns:
        Whether the run was marked.
    """
    from tracking.reliability import quick_http_failure

    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return False
    try:
        with quick_http_failure():
            run = TrackedRun(run_id)
            run.set_tags({MLFLOW_RUN_NAME: f"failed-{command}", P.TAG_ENTRY: command,
                          P.TAG_STATE: "failed", P.TAG_ERROR: clip(message, _TAG_CHARS)})
            run.client.set_terminated(run_id, "FAILED")
    except Exception as e:  # the store may be the failure itself
        log.debug("could not mark run %s FAILED: %s", run_id, _first_line(e))
        return False
    os.environ.pop("MLFLOW_RUN_ID", None)
    return True


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
        self.client = mlflow_client or client()
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
    FAILED through :func:`run_guard`); MLflow passes the OSError of a local store through."""
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


def find_complete_run(exp_id: str, config_hash: str, code: str) -> str | None:
    """The newest FINISHED, complete run with this config hash and code version."""
    flt = (
        f"tags.`{P.TAG_HASH}` = '{config_hash}' and tags.`{P.TAG_STATE}` = 'complete'"
        f" and tags.`{P.TAG_CODE}` = '{code}' and attributes.status = 'FINISHED'"
    )
    runs = client().search_runs([exp_id], flt, order_by=["attributes.start_time DESC"],
                                max_results=1)
    return runs[0].info.run_id if runs else None


def new_run(exp_id: str, name: str, tags: Mapping[str, str], parent: str | None = None) -> str:
    all_tags = {**tags, MLFLOW_RUN_NAME: name}
    if parent:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent
    return client().create_run(exp_id, run_name=name, tags=all_tags).info.run_id


def attach_or_create(exp_id: str, name: str, tags: Mapping[str, str],
                     parent: str | None = None) -> TrackedRun:
    """Attach to the run ``mlflow run`` created (``MLFLOW_RUN_ID``) or create one."""
    env_run = os.environ.get("MLFLOW_RUN_ID")
    if env_run and parent is None:
        run = TrackedRun(env_run)
        run.set_tags({**tags, MLFLOW_RUN_NAME: name})
        os.environ.pop("MLFLOW_RUN_ID")  # later runs of this process are our own
        return run
    return TrackedRun(new_run(exp_id, name, tags, parent))


@contextmanager
def run_guard(run: TrackedRun) -> Iterator[TrackedRun]:
    """End ``run`` FAILED (error tag) or KILLED on any exception; re-raise it."""
    try:
        yield run
    except (Interrupted, KeyboardInterrupt):
        _end_badly(run, "killed", "KILLED", "interrupted by signal")
        raise
    except BaseException as e:
        _end_badly(run, "failed", "FAILED", _first_line(e))
        raise


def _end_badly(run: TrackedRun, state: str, status: str, reason: str) -> None:
    run.stop_system_metrics()
    try:
        run.set_tags({P.TAG_STATE: state, P.TAG_ERROR: clip(reason, _TAG_CHARS)})
        run.client.set_terminated(run.run_id, status)
    except Exception as e:  # the store itself may be the failure; reaping fixes it later
        log.error("could not mark run %s %s: %s", run.run_id, status, _first_line(e))


def pid_alive(pid: int, started_ms: float) -> bool:
    """Whether process ``pid`` on this host exists and is the one started by ``started_ms``."""
    import psutil

    try:
        proc = psutil.Process(pid)
        # a recycled pid belongs to a process started after the run
        return proc.create_time() * 1000 <= started_ms + 5000
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def reap_stale_runs(exp_id: str, now_s: float | None = None) -> list[str]:
    """Mark RUNNING runs whose process is gone as FAILED; return their ids.

    A run with a langprune pid tag on this host whose process no longer exists died (SIGKILL,
    power loss). A run without that tag older than :data:`STALE_UNSTARTED_S` is an
    ``mlflow run`` whose environment set-up failed before our code started.
    """
    now_ms = (now_s or time.time()) * 1000
    host = socket.gethostname()
    own = os.environ.get("MLFLOW_RUN_ID")
    reaped = []
    for r in client().search_runs([exp_id], "attributes.status = 'RUNNING'", max_results=5000):
        if r.info.run_id == own:
            continue
        tags = r.data.tags
        pid = tags.get(P.TAG_PID)
        if pid is not None:
            if tags.get(P.TAG_HOST) != host or pid_alive(int(pid), r.info.start_time):
                continue
            reason = "process died without ending the run (killed?)"
        elif now_ms - r.info.start_time > STALE_UNSTARTED_S * 1000:
            reason = "never started: environment set-up failed or was abandoned"
        else:
            continue
        _end_badly(TrackedRun(r.info.run_id), "failed", "FAILED", reason)
        reaped.append(r.info.run_id)
        log.warning("marked stale run %s FAILED: %s", r.info.run_id, reason)
    return reaped
