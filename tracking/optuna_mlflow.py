"""Optuna trials as MLflow child runs of a study's parent run (our own small callback).

The Optuna integration's ``MLflowCallback`` is deprecated, and it logs into the fluent global
run. This module drives explicit run ids through :class:`tracking.runs.TrackedRun`:

- :meth:`TrialLogger.start` (called by the objective) creates the trial's child run with its
  params and writes the run id into the trial (user attr :data:`RUN_ID_ATTR`);
- :meth:`TrialLogger.__call__` (an Optuna callback, after ``tell``) logs the objective as a
  metric and the final state, ends the child run and refreshes the parent's summary;
- :func:`summarise_study` / :func:`log_summary` put the best blend, its run id and the
  improvement over target-only on the parent; :func:`log_study_plots` adds Optuna's own
  figures (matplotlib, no plotly) and the trials table.
"""

from __future__ import annotations

import logging
import math
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import optuna
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.trial import FrozenTrial, TrialState

from tracking import params as P
from tracking import runs as R
from tracking.launch import claim_launched_run, launched_run_id

log = logging.getLogger(__name__)

TAG_STUDY = "langprune.study"  # the study name, on the parent and on every trial run
TAG_TRIAL = "langprune.trial"  # the Optuna trial number
TAG_MODE = "langprune.search_mode"  # fast | exact
TAG_OPTUNA_STATE = "optuna.state"  # COMPLETE | FAIL | ...
RUN_ID_ATTR = "mlflow_run_id"  # trial user attr: the trial's child run
FAIL_ATTR = "fail_reason"  # trial user attr: why a trial failed (one line)
BLEND_ATTR = "calib_blend"  # trial user attr: the effective blend, canonical string
TARGET_ONLY_ATTR = "target_only"  # trial user attr: True when the blend is target-only
PARENT_ATTR = "mlflow_parent_run"  # study user attr: the study's MLflow parent run id


def find_study_parents(exp_id: str, study_name: str) -> list[str]:
    """Run ids tagged as the parent of ``study_name``, oldest first (start time, then id)."""
    flt = f"tags.`{TAG_STUDY}` = '{study_name}' and tags.`{P.TAG_KIND}` = 'search'"
    runs = R.client().search_runs([exp_id], flt, max_results=1000)
    return [r.info.run_id for r in sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))]


def create_study_parent(exp_id: str, study_name: str, tags: Mapping[str, str]) -> str:
    """The parent run for a new study: an existing one with its tag, else a new run.

    Called by the one worker that created the Optuna study (creation is atomic), which then
    records the id in the study (:data:`PARENT_ATTR`), so concurrent workers cannot make two.
    Under ``mlflow run`` the run MLflow created becomes the parent (taken over, unless a job
    of this process claimed it already).
    """
    found = find_study_parents(exp_id, study_name)
    if found:  # the study's storage was recreated; keep its runs together
        return found[0]
    own = {**tags, P.TAG_KIND: "search", TAG_STUDY: study_name}
    return R.attach_or_create(exp_id, f"search-{study_name}", own, take_launched=True).run_id


def _usable_parent(exp_id: str, run_id: str | None) -> str | None:
    """``run_id`` if it is a live run of this experiment in this tracking store, else None."""
    if not run_id:
        return None
    try:
        info = R.client().get_run(run_id).info
    except Exception as e:  # another tracking store, or deleted for good
        log.warning("study parent run %s not found (%s); electing one by tag", run_id, e)
        return None
    if info.experiment_id != exp_id or info.lifecycle_stage != "active":
        log.warning("study parent run %s is deleted or in another experiment; electing one "
                    "by tag", run_id)
        return None
    return run_id


def _elect_by_tag(exp_id: str, study_name: str,
                  tags: Mapping[str, str]) -> tuple[str, R.TrackedRun | None]:
    """Find or create the parent by tag (studies whose record names no usable parent).

    If several workers create one at the same moment, the oldest (start time, then run id)
    wins and the others delete theirs; a losing run that ``mlflow run`` created is kept as
    this worker's run (returned second).
    """
    found = find_study_parents(exp_id, study_name)
    if found:
        return found[0], None
    env_run = launched_run_id()  # before create_study_parent may take it over
    created = create_study_parent(exp_id, study_name, tags)
    found = find_study_parents(exp_id, study_name) or [created]
    if created == found[0]:
        return created, None
    if created != env_run:
        R.client().delete_run(created)
        return found[0], None
    worker = R.TrackedRun(created)
    worker.set_tags({P.TAG_KIND: "search-worker", MLFLOW_PARENT_RUN_ID: found[0]})
    return found[0], worker


def open_study_parent(exp_id: str, study_name: str, tags: Mapping[str, str],
                      parent_id: str | None = None) -> tuple[R.TrackedRun, R.TrackedRun | None]:
    """Open the study's parent run; returns ``(parent, this worker's own run)``.

    Every worker of a study (and every restart) shares one parent: ``parent_id``, the run the
    study records (:data:`PARENT_ATTR`, see :func:`create_study_parent`). A study without a
    usable record (made by an older version, or its parent was deleted) elects one by the tag
    :data:`TAG_STUDY`. A run that ``mlflow run`` created and that is not the parent becomes a
    ``search-worker`` child of it (the worker run returned; None otherwise). The parent is set
    RUNNING with this process's pid, so the stale-run reaper leaves it alone while this worker
    lives.
    """
    worker: R.TrackedRun | None = None
    recorded = _usable_parent(exp_id, parent_id)
    if recorded is None:
        recorded, worker = _elect_by_tag(exp_id, study_name, tags)
    parent = R.TrackedRun(recorded)
    env_run = launched_run_id()  # None once taken over above (as parent or elector's worker)
    if env_run == recorded:
        claim_launched_run()  # the parent is the launched run: later runs are our own
    elif env_run and worker is None:
        worker = R.take_over_launched_run(f"worker-{study_name}", {
            **tags, P.TAG_KIND: "search-worker", TAG_STUDY: study_name,
            MLFLOW_PARENT_RUN_ID: recorded})
    R.client().update_run(parent.run_id, status="RUNNING")
    if "langprune.error" in R.client().get_run(parent.run_id).data.tags:
        R.client().delete_tag(parent.run_id, "langprune.error")  # an earlier worker's failure
    parent.set_tags({P.TAG_STATE: "running", P.TAG_PID: tags[P.TAG_PID],
                     P.TAG_HOST: tags[P.TAG_HOST]})
    return parent, worker


def parent_complete(parent: R.TrackedRun) -> bool:
    """True when a worker already ended the study's parent with its verdict."""
    run = parent.client.get_run(parent.run_id)
    return run.info.status == "FINISHED" and run.data.tags.get(P.TAG_STATE) == "complete"


class TrialLogger:
    """Creates and ends one MLflow child run per Optuna trial, under the study's parent run.

    Args:
        parent: The study's parent run.
        exp_id: MLflow experiment id of the parent.
        tags: Tags every trial run carries (study name, mode, code version, ...).
        params: Params every trial run carries (model, method, target, objective, ...).
    """

    def __init__(self, parent: R.TrackedRun, exp_id: str, tags: Mapping[str, str],
                 params: Mapping[str, str]) -> None:
        self.parent = parent
        self.exp_id = exp_id
        self.tags = dict(tags)
        self.params = dict(params)

    def start(self, trial: optuna.Trial, name: str, params: Mapping[str, str]) -> R.TrackedRun:
        """Open the child run of ``trial`` and record its id on the trial."""
        tags = {**self.tags, P.TAG_KIND: "trial", P.TAG_STATE: "running",
                TAG_TRIAL: str(trial.number)}
        run = R.TrackedRun(R.new_run(self.exp_id, name, tags, parent=self.parent.run_id))
        run.log_params({**self.params, **params, "trial_number": str(trial.number)})
        trial.set_user_attr(RUN_ID_ATTR, run.run_id)
        return run

    def __call__(self, study: optuna.Study, frozen: FrozenTrial) -> None:
        """Optuna callback: objective metric, final state, end the run, refresh the parent."""
        run_id = frozen.user_attrs.get(RUN_ID_ATTR)
        if run_id:
            end_trial_run(R.TrackedRun(run_id), frozen)
        try:
            log_summary(self.parent, summarise_study(study), step=frozen.number)
        except Exception as e:  # a summary must never stop the study
            log.warning("could not update the study summary: %s", e)


def end_trial_run(run: R.TrackedRun, frozen: FrozenTrial, killed: bool = False) -> None:
    """Log the trial's outcome on its run and end it (FINISHED, FAILED or KILLED)."""
    run.set_tags({TAG_OPTUNA_STATE: frozen.state.name})
    if frozen.duration is not None:
        run.log_metrics({"trial.duration_s": frozen.duration.total_seconds()})
    if frozen.state == TrialState.COMPLETE and frozen.value is not None:
        run.log_metrics({"objective": frozen.value})
        run.finish(state="complete")
        return
    reason = str(frozen.user_attrs.get(FAIL_ATTR, frozen.state.name))
    run.set_tags({"langprune.error": reason[:500]})
    if killed:
        run.finish(state="killed", status="KILLED")
    else:
        run.finish(state="failed", status="FAILED")


@dataclass(frozen=True)
class StudySummary:
    """The study so far. Improvements are oriented so that positive = better than target-only.

    Attributes:
        n_complete: Completed trials.
        n_failed: Failed trials.
        direction: ``minimize`` or ``maximize``.
        best_trial: Number of the best completed trial (-1 if none).
        best_value: Its objective.
        best_blend: Its effective blend.
        best_run: Its MLflow child run id.
        target_only_value: Objective of the (first) completed target-only trial, NaN if none.
        improvement: ``target_only - best`` when minimising, ``best - target_only`` otherwise.
        improvement_rel: ``improvement / |target_only|``.
    """

    n_complete: int
    n_failed: int
    direction: str
    best_trial: int = -1
    best_value: float = math.nan
    best_blend: str = ""
    best_run: str = ""
    target_only_value: float = math.nan
    improvement: float = math.nan
    improvement_rel: float = math.nan


def summarise_study(study: optuna.Study) -> StudySummary:
    """Best completed trial and its improvement over the target-only trial."""
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    failed = sum(t.state == TrialState.FAIL for t in trials)
    direction = study.direction.name.lower()
    if not done:
        return StudySummary(0, failed, direction)
    pick = min if direction == "minimize" else max
    best = pick(done, key=lambda t: (t.value, t.number) if direction == "minimize"
                else (t.value, -t.number))
    base = next((t for t in done if t.user_attrs.get(TARGET_ONLY_ATTR)), None)
    base_value = base.value if base is not None else math.nan
    sign = 1.0 if direction == "minimize" else -1.0
    improvement = sign * (base_value - best.value)
    rel = improvement / abs(base_value) if base_value != 0 else math.nan
    return StudySummary(
        len(done), failed, direction, best.number, float(best.value),
        str(best.user_attrs.get(BLEND_ATTR, "")), str(best.user_attrs.get(RUN_ID_ATTR, "")),
        float(base_value), float(improvement), float(rel),
    )


def log_summary(parent: R.TrackedRun, summary: StudySummary, step: int = 0) -> None:
    """Best blend, its run id and the improvement over target-only on the parent run.

    ``step`` (the trial number) makes the metrics a best-so-far curve in the MLflow UI.
    """
    parent.set_tags({
        "langprune.best_trial": str(summary.best_trial),
        "langprune.best_blend": summary.best_blend,
        "langprune.best_run": summary.best_run,
        "langprune.trials_complete": str(summary.n_complete),
        "langprune.trials_failed": str(summary.n_failed),
    })
    parent.log_metrics({
        "best.objective": summary.best_value,
        "target_only.objective": summary.target_only_value,
        "improvement.abs": summary.improvement,
        "improvement.rel": summary.improvement_rel,
        "trials.complete": summary.n_complete,
        "trials.failed": summary.n_failed,
    }, step=step)


def log_study_plots(parent: R.TrackedRun, study: optuna.Study) -> list[str]:
    """Optuna's optimisation history and parameter importances (PNG) and the trials table.

    Returns the artifact names logged; a figure that cannot be drawn (e.g. importances with
    fewer than two completed trials) is skipped with a warning.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless; no-op when already selected
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    logged: list[str] = []
    parent.log_table(study.trials_dataframe(), "optuna/trials.csv")
    logged.append("optuna/trials.csv")
    figures = {"optuna/history.png": ovm.plot_optimization_history,
               "optuna/param_importances.png": ovm.plot_param_importances}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for name, plot in figures.items():
            try:
                ax = plot(study)
                path = Path(tmp) / Path(name).name
                ax.figure.savefig(path, dpi=110, bbox_inches="tight")
                plt.close(ax.figure)
                parent.log_artifact(path, "optuna")
                logged.append(name)
            except Exception as e:  # too few trials, constant objective, ...
                log.warning("optuna figure %s skipped: %s", name, e)
    return logged
