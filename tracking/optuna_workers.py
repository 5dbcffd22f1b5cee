"""Worker-side trial bookkeeping on a shared Optuna study: whose trial, orphans, the verdict.

Several workers share one study (:mod:`tracking.optuna_storage`). A trial records its worker
(``host:pid``, :func:`record_worker`) first thing, so a killed worker's running trial is failed
at once by the next worker started on the same host (:func:`fail_orphaned_trials`, run by
:func:`tracking.optuna_storage.open_study`), from other hosts by Optuna's heartbeat after
:data:`tracking.optuna_storage.GRACE_S`. When the study is complete, one worker is elected to
run what follows (:func:`claim_verdict`).

Optuna's private API is used in two places, each because the public one cannot do it (optuna
is pinned; the scale-out test, ``tests/e2e/test_scale_out.py``, exercises them):
``Study._storage``, to create the side study that elects one worker in the storage already
open (:func:`claim_verdict`); ``FrozenTrial._trial_id``, to set a user attr on another
worker's trial (:func:`fail_orphaned_trials`).
"""

from __future__ import annotations

import logging
import os
import socket
import time

import optuna
from optuna.trial import TrialState

from tracking import optuna_mlflow as OM
from tracking import runs as R

log = logging.getLogger(__name__)

WORKER_ATTR = "worker"  # trial user attr: host:pid of the worker running it
VERDICT_ATTR = "langprune_verdict"  # study user attr: host:pid:claim_ms of the verdict's worker


def record_worker(trial: optuna.Trial) -> None:
    """Record this process (``host:pid``) on its trial: first thing a trial does, so a
    restarted worker fails the trial at once if this process dies."""
    trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")


def fail_orphaned_trials(study: optuna.Study) -> list[int]:
    """Fail the RUNNING trials whose worker on this host is gone; returns their numbers.

    A worker killed with SIGKILL (or by the OOM killer) cannot fail its own trial. Optuna's
    heartbeat fails it only after :data:`tracking.optuna_storage.GRACE_S` and only from
    inside ``optimize``; until then the trial counts as started and blocks the verdict. A
    trial records its worker (``host:pid``, :func:`record_worker`) first thing, so a
    restarted worker on the same host fails it at once (a recycled pid is told apart by the
    process start time). Trials of other hosts are left to the heartbeat. The trial's MLflow
    run was already ended FAILED by the stale-run reaper.
    """
    host = socket.gethostname()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner, _, pid = str(t.user_attrs.get(WORKER_ATTR, "")).rpartition(":")
        if owner != host or not pid.isdigit() or t.datetime_start is None:
            continue
        if R.pid_alive(int(pid), t.datetime_start.timestamp() * 1000):
            continue
        try:
            # Trial(study, id) is Optuna's handle on a stored trial (FrozenTrial has no setter);
            # it needs the storage's trial id, which FrozenTrial keeps private (_trial_id)
            optuna.Trial(study, t._trial_id).set_user_attr(
                OM.FAIL_ATTR, f"WorkerDied: worker {owner}:{pid} died during the trial")
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        except (ValueError, RuntimeError) as e:  # another restarted worker was quicker
            log.info("trial %d was already finished: %s", t.number, e)
            continue
        failed.append(t.number)
        _mark_trial_run(study.trials[t.number])
        log.warning("trial %d of %s failed: its worker %s:%s died", t.number,
                    study.study_name, owner, pid)
    return failed


def _mark_trial_run(frozen: optuna.trial.FrozenTrial) -> None:
    """Record the failed state on the trial's run; end it FAILED if nobody did yet."""
    run_id = frozen.user_attrs.get(OM.RUN_ID_ATTR)
    if not run_id:
        return
    run = R.TrackedRun(run_id)
    if run.client.get_run(run_id).info.status == "RUNNING":
        OM.end_trial_run(run, frozen)
    else:
        run.set_tags({OM.TAG_OPTUNA_STATE: frozen.state.name})


def claim_verdict(study: optuna.Study) -> bool:
    """Elect the one worker that runs the verdict of a complete study.

    Creating a study is atomic (unique name), so the worker that creates the side study
    ``<name>--verdict`` wins; the others skip the verdict. The winner records itself as
    ``host:pid:claim time`` in the study; a worker restarted on the same host takes over when that
    process is gone and the parent has no verdict yet (a killed verdict is re-run).
    """
    # private: creates the side study only (see tracking.optuna_storage._enqueue_slots)
    storage = study._storage
    side = f"{study.study_name}--verdict"
    me = f"{socket.gethostname()}:{os.getpid()}:{time.time() * 1000:.0f}"
    try:
        storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], side)
    except optuna.exceptions.DuplicatedStudyError:
        owner = str(study.user_attrs.get(VERDICT_ATTR, ""))
        host, _, rest = owner.partition(":")
        pid, _, start = rest.partition(":")
        gone = (host == socket.gethostname() and pid.isdigit()
                and not R.pid_alive(int(pid), float(start or 0)))
        if not gone:
            return False
        log.info("the verdict's worker %s is gone; taking over", owner)
    study.set_user_attr(VERDICT_ATTR, me)
    return True
