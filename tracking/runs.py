"""The life cycle of langprune's MLflow runs: start or take over, reuse, finish, reap stale ones.

Every run is driven through :class:`mlflow.MlflowClient` with an explicit run id (no fluent
global state), so one process can log a dense baseline and a pruned run side by side. A run
counts as a result only when it is FINISHED *and* tagged ``langprune.state=complete``; that
tag is written last, after every param, metric and artifact. Runs that ``mlflow run`` leaves
RUNNING after a failed environment set-up, or whose process died, are never taken as live:
:func:`reap_stale_runs` marks them FAILED. The run ``mlflow run`` launched this process with
is taken over once, visibly (:func:`take_over_launched_run`, :func:`attach_or_create`), or
marked failed when a command stops before that (:func:`fail_env_run`); see
:mod:`tracking.launch`.

The store helpers (:mod:`tracking.store`) and :class:`TrackedRun` (:mod:`tracking.tracked_run`)
are re-exported here, so ``from tracking import runs as R`` reaches all of a run's API. The
code of those modules and of this one looks each name up in its home module
(``tracking.store.client``); callers of ``R.<name>`` look it up here. A test that replaces
one (the client, say) replaces it in both places.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from tracking import params as P
from tracking import store as S
from tracking.launch import claim_launched_run, launched_run_id
from tracking.store import (
    _first_line,
    active_experiment_name,
    check_tracking_reachable,
    client,
    default_artifact_location,
    experiment_id,
    tracking_uri,
)
from tracking.tracked_run import TrackedRun, is_concurrent_insert, safe_artifact_name

__all__ = [
    # the run life cycle (this module)
    "STALE_UNSTARTED_S", "Interrupted", "attach_or_create", "clip", "fail_env_run",
    "find_complete_run", "new_run", "pid_alive", "reap_stale_runs", "run_guard",
    "take_over_launched_run",
    # re-exported from tracking.store
    "active_experiment_name", "check_tracking_reachable", "client",
    "default_artifact_location", "experiment_id", "tracking_uri",
    # re-exported from tracking.tracked_run
    "TrackedRun", "is_concurrent_insert", "safe_artifact_name",
]

log = logging.getLogger(__name__)

_TAG_CHARS = 500  # langprune.error: enough for one line, short enough for the runs table
# A RUNNING run that never got a langprune pid tag is an environment set-up that died
# (``mlflow run`` creates the run before building the env); after this long it is stale.
STALE_UNSTARTED_S = 3600.0


class Interrupted(BaseException):
    """Raised by the SIGTERM/SIGINT handler so that runs end KILLED, not FAILED."""


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters at a word boundary, marked with "…"."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    if space > limit // 2:  # a word boundary not too far back
        cut = cut[:space]
    return cut.rstrip(" ,;:") + "…"


def fail_env_run(command: str, message: str) -> bool:
    """Mark the run ``mlflow run`` created (``MLFLOW_RUN_ID``) as our failed run.

    Called when a command fails before it took that run over: without this the run would
    end FAILED under a random MLflow name with no reason. It gets the name
    ``failed-<command>``, the tags ``langprune.error`` and ``langprune.state=failed``, and
    ends FAILED; then it is claimed (:func:`tracking.launch.claim_launched_run`). A run a job
    took over already is left alone. Best effort: quick requests, every store error
    swallowed, so the original error is what the user sees.

    Returns:
        Whether the run was marked.
    """
    from tracking.reliability import quick_http_failure

    run_id = launched_run_id()
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
    claim_launched_run()  # ended as ours: nothing else may touch it now
    return True


def find_complete_run(exp_id: str, config_hash: str, code: str) -> str | None:
    """The newest FINISHED, complete run with this config hash and code version."""
    flt = (
        f"tags.`{P.TAG_HASH}` = '{config_hash}' and tags.`{P.TAG_STATE}` = 'complete'"
        f" and tags.`{P.TAG_CODE}` = '{code}' and attributes.status = 'FINISHED'"
    )
    runs = S.client().search_runs([exp_id], flt, order_by=["attributes.start_time DESC"],
                                max_results=1)
    return runs[0].info.run_id if runs else None


def new_run(exp_id: str, name: str, tags: Mapping[str, str], parent: str | None = None) -> str:
    """Create a RUNNING run named ``name`` (a child of ``parent`` if given); its id."""
    all_tags = {**tags, MLFLOW_RUN_NAME: name}
    if parent:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent
    return S.client().create_run(exp_id, run_name=name, tags=all_tags).info.run_id


def take_over_launched_run(name: str, tags: Mapping[str, str]) -> TrackedRun | None:
    """Make the run ``mlflow run`` launched this process with our run ``name``, if any.

    The launched run gets ``name`` and ``tags``, then is claimed
    (:func:`tracking.launch.claim_launched_run`): later runs of this process are our own, and
    a failing command no longer marks it (:func:`fail_env_run`).

    Returns:
        The run taken over; None when the process was not launched by ``mlflow run`` or a
        job took the run over already.
    """
    launched = launched_run_id()
    if launched is None:
        return None
    run = TrackedRun(launched)
    run.set_tags({**tags, MLFLOW_RUN_NAME: name})
    claim_launched_run()  # ours now: later runs of this process are our own
    return run


def attach_or_create(exp_id: str, name: str, tags: Mapping[str, str],
                     parent: str | None = None, *, take_launched: bool = True) -> TrackedRun:
    """Take over the run ``mlflow run`` launched this process with, or create a new run.

    Args:
        exp_id: Experiment of a new run.
        name: The run's name (the launched run is renamed to it).
        tags: The run's tags.
        parent: Parent of a new child run; a child is always a new run.
        take_launched: Whether this run is the job's own: then (the default), with no
            ``parent``, the launched run, while no job has claimed it, becomes this run and
            is claimed (:func:`take_over_launched_run`). Without it, a new run.
    """
    if take_launched and parent is None:
        run = take_over_launched_run(name, tags)
        if run is not None:
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
    own = launched_run_id()  # ours, not stale: `mlflow run` created it for this process
    reaped = []
    for r in S.client().search_runs([exp_id], "attributes.status = 'RUNNING'", max_results=5000):
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
