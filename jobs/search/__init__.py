"""Optuna search for a calibration blend that beats target-only calibration
(``docs/science.md#blend-search``). Optuna is imported only by this package and by
:mod:`tracking.optuna_storage` (storage, slots), :mod:`tracking.optuna_workers` (workers'
trials) and :mod:`tracking.optuna_mlflow` (trials as MLflow runs).

The search's documentation is split over its parts:

- :mod:`jobs.search.space`: the search space (raw weights, blends, window counts, trial 0);
- :mod:`jobs.search.objective`: what a trial optimises and in which direction;
- :mod:`jobs.search.trials`: the objective function, fast versus exact trials and where they
  differ, the fast-mode statistics and their cache;
- :mod:`jobs.search.verdict`: the paired re-runs that answer the question;
- :mod:`jobs.search.job`: the entry point :func:`run_search`, studies, resume, the MLflow
  parent run;
- :mod:`tracking.optuna_storage`: several workers on one study (slots, elections, seeding);
- :mod:`tracking.optuna_workers`: a worker's own trials (its record, orphaned trials, the
  verdict's election).
"""

from __future__ import annotations

from jobs.search.job import (
    SearchResult,
    default_study_name,
    fixed_trials,
    open_study,
    run_search,
    study_config,
)
from jobs.search.objective import Objective, TrialFailure
from jobs.search.space import (
    PARAM_PREFIX,
    BlendPoint,
    blend_from_raw,
    corner,
    param_name,
    search_pool,
    single,
    suggest_blend,
)
from jobs.search.trials import language_stats, run_trials
from jobs.search.verdict import (
    CONFIDENCE,
    Verdict,
    challenger,
    decide,
    log_verdict,
    make_verdict,
    paired_interval,
    run_verdict,
)
from tracking.optuna_storage import (
    GRACE_S,
    HEARTBEAT_S,
    SLOTS_ATTR,
    NoSlotLeft,
    SlotStorage,
    safe_url,
    started_trials,
    storage_url,
    study_complete,
)
from tracking.optuna_workers import VERDICT_ATTR, WORKER_ATTR, claim_verdict, fail_orphaned_trials

__all__ = [
    "CONFIDENCE", "GRACE_S", "HEARTBEAT_S", "PARAM_PREFIX", "SLOTS_ATTR", "VERDICT_ATTR",
    "WORKER_ATTR", "BlendPoint", "NoSlotLeft", "Objective", "SearchResult", "SlotStorage",
    "TrialFailure", "Verdict", "blend_from_raw", "challenger", "claim_verdict", "corner",
    "decide", "default_study_name", "fail_orphaned_trials", "fixed_trials", "language_stats",
    "log_verdict", "make_verdict", "open_study", "paired_interval", "param_name",
    "run_search", "run_trials", "run_verdict", "safe_url", "search_pool", "single",
    "started_trials", "storage_url", "study_complete", "study_config", "suggest_blend",
]
