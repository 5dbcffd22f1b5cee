"""The MLflow tracking store this process writes to: client, URI, reachability, experiments.

:class:`tracking.tracked_run.TrackedRun` and the run life cycle (:mod:`tracking.runs`) get
their :class:`mlflow.MlflowClient` from :func:`client`, looked up as ``tracking.store.client``
at call time; callers of ``tracking.runs.client`` (a re-export) look it up there, so a test
that replaces the client replaces it in both modules.

Which experiment a command's runs go to also lives here: the one
``mlflow run`` chose (read through :mod:`tracking.launch`), else the configured name,
created with its artifacts next to a SQLite database (:func:`default_artifact_location`).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from pipeline.errors import LangpruneError
from tracking.launch import launched_experiment_id, launched_run_id

log = logging.getLogger(__name__)


def client() -> MlflowClient:
    """A client of the current tracking store (``MLFLOW_TRACKING_URI`` or MLflow's default)."""
    return MlflowClient()


def tracking_uri() -> str:
    """The URI of the current tracking store."""
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


def experiment_id(name: str) -> str:
    """The active ``mlflow run`` experiment if we run under it, else ``name`` (created)."""
    env_run = launched_run_id()
    if env_run:
        return client().get_run(env_run).info.experiment_id
    env_exp = launched_experiment_id()
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

    ``MLFLOW_RUN_ID`` (the run ``mlflow run`` created, while unclaimed) or
    ``MLFLOW_EXPERIMENT_ID`` name it through the store (both read by :mod:`tracking.launch`);
    ``MLFLOW_EXPERIMENT_NAME`` names it directly. None when none is set or the store cannot
    say quickly (the preflight then reports the store).
    """
    from tracking.reliability import quick_http_failure

    run_id, exp_id = launched_run_id(), launched_experiment_id()
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
