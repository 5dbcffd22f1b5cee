"""The run ``mlflow run`` launched this process with, and the one take-over of it.

``mlflow run`` creates a run before it starts our command and announces it in the
environment: ``MLFLOW_RUN_ID`` (the run) and ``MLFLOW_EXPERIMENT_ID`` (its experiment). That
run is this process's to adopt exactly once. The first job that takes it over calls
:func:`claim_launched_run`, which removes ``MLFLOW_RUN_ID``: later runs of this process are
runs of our own, and the command line no longer marks the run when a command fails
(:func:`tracking.runs.fail_env_run`). ``MLFLOW_EXPERIMENT_ID`` stays; it still names the
experiment every run of the process goes to.

This module is the only code that reads or removes these variables; everything else asks it.
The environment itself is the state (nothing is cached here), so a child process inherits
exactly what is left unclaimed, and a test sets or deletes the variables as ``mlflow run``
would. Cheap to import: it imports nothing but :mod:`os`.
"""

from __future__ import annotations

import os

RUN_ID_VAR = "MLFLOW_RUN_ID"  # set by `mlflow run`: the run it created for this process
EXPERIMENT_ID_VAR = "MLFLOW_EXPERIMENT_ID"  # set by `mlflow run`: that run's experiment


def launched_run_id() -> str | None:
    """The run ``mlflow run`` created for this process, while no job has claimed it.

    Only looks; see :func:`claim_launched_run` to take it over. None when the process was
    not launched by ``mlflow run`` (or the variable is empty) or the run was claimed already.
    """
    return os.environ.get(RUN_ID_VAR) or None


def launched_experiment_id() -> str | None:
    """The experiment ``mlflow run`` filed this process's run in, if any (only looks).

    Never claimed: it stays set after :func:`claim_launched_run`, since every run of the
    process belongs to that experiment.
    """
    return os.environ.get(EXPERIMENT_ID_VAR) or None


def claim_launched_run() -> str | None:
    """Take the launched run over: return its id and forget it for the rest of the process.

    Call it once the run is really ours (named, tagged, or ended by us), right where a job
    adopts it; after it, :func:`launched_run_id` is None, so no other job, search worker or
    the command line's failure handler touches that run again. The first caller wins.

    Returns:
        The claimed run id, or None when there was none left to claim.
    """
    run_id = launched_run_id()
    if run_id is not None:
        os.environ.pop(RUN_ID_VAR, None)
    return run_id
