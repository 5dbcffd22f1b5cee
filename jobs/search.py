"""Optuna search for a calibration blend that beats target-only calibration (SCIENCE.md
"Calibration-blend search"); with :mod:`tracking.optuna_mlflow` the only module importing optuna.

**Search space.** One ``suggest_float("w_<lang>", 0, 1)`` per pool language; the blend is the
raw weights normalised to sum 1 (all zero -> the uniform blend, the limit of equal weights),
so every point of the cube is a valid blend and the raw and normalised weights are both
logged. A blend becomes ``n_samples`` calibration windows by largest-remainder rounding
(:func:`pipeline.data.sampler.largest_remainder`); the objective depends only on these
*counts*, and the *effective blend* ``counts / n_samples`` is what a trial calibrates on
(``calib_blend``). Trial 0 is the target-only blend, enqueued when the study has no trials;
``enqueue_single=true`` also enqueues every single-language blend.

**Objective** (one direction table, :data:`pipeline.config.OBJECTIVES_LOWER`): ``ppl`` or
``bpb`` of the target language (minimised); a task score such as ``sib200`` (its accuracy in
the target language) or ``<task>.<metric>`` for any lm-eval task (maximised). A weighted mix
``"ppl:0.5,sib200:10"`` is minimised as ``sum_t w_t * s_t * metric_t`` with ``s_t = +1`` for
lower-is-better and ``-1`` for higher-is-better metrics (the weights set the scales).

**Modes.** ``exact``: every trial is a full tracked pruned run (:func:`jobs.main.run_main`:
layer-wise prune with the blend's windows, the configured evaluation, masks), a child of the
trial's run, and reused like any run with the same config. ``fast``: one shared pass per pool
language over the *dense* model stores, per decoder layer and input group, Wanda's per-window
column sums of x^2 (or SparseGPT's X X^T summed over the language's windows); a trial adds
them by the blend's window counts, prunes every layer with the pure pruners (no forward pass),
and evaluates only the target language on ``search_eval_tokens`` tokens (plus the objective's
tasks). Where fast differs from exact:

- *Layer 0* statistics are exactly those of exact mode for ``calib_set=0`` (Wanda: the same
  windows, summed in another order; tested). For ``calib_set=k>0`` exact mode takes windows
  ``[k*c, (k+1)*c)`` of each language's shuffled grid, fast mode the first ``c`` of
  ``[k*n, (k+1)*n)``: an equally sized sample of the same corpus, not the same windows.
- *Later layers*: exact mode feeds layer i the outputs of the already *pruned* layers < i;
  fast mode uses the dense model's inputs (no error propagation; ``true_sequential`` has no
  effect). This is the approximation whose ranking fidelity the benchmark measures.
- *SparseGPT*: the combined X X^T is ``sum_L c_L / n * (X X^T over all n windows of L)``, the
  same expectation as the blend's windows but not the same windows even at layer 0 (storing
  per-window Hessians is infeasible). Only single-language blends are exact at layer 0.
- Masks are not logged in fast mode (the trial run logs the achieved sparsity only).

The statistics are cached in memory and on disk (safetensors under the model cache, keyed by
the windows' sha256, model and code version), so a restarted or second worker on the same
host skips the shared pass.

**Studies, resume, workers.** The study lives in RDB storage (``storage``, default
``sqlite:///optuna.db`` in the working directory) under ``study_name`` (default
``blend-<target>-<method>-<objective>-<mode>``), ``load_if_exists``. ``n_trials`` is the
*total* number of trials the study should have started (running, complete, failed): a
restarted worker runs only the missing ones, several workers stop together when the study
reaches it. The count is exact however many workers start at once: the worker that creates
the study (creation is atomic, so it is unique) enqueues every trial up front as a *slot*
(trial 0 = target-only with fixed params, the others empty, so the sampler fills them in) and
then marks the study provisioned (user attr ``langprune_slots``); the others wait for that
mark. Workers only ever take an enqueued slot (an atomic WAITING -> RUNNING update: ``SELECT
... FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite) and never create a trial of
their own (:class:`SlotStorage`), so trial numbers are unique and dense and the total is
``n_trials``. Raising ``n_trials`` of an existing study tops the slots up, exactly, even when
several workers are started with the new count at once (one is elected per count). The study
records the config it was created with and refuses a different one.
A killed worker's running trial is failed at once by the next worker started on the same host
(:func:`fail_orphaned_trials`), from other hosts by Optuna's heartbeat after ``GRACE_S``. The
sampler is TPE, seeded per trial from ``seed`` and the number of trials started so far (plus
the pid when other workers are active), so a resumed study does not replay its first trials
and concurrent workers do not duplicate each other.

All trial runs of all workers are children of one MLflow parent run. The study's creator
creates it (under ``mlflow run`` it adopts the run MLflow created) before it enqueues the slots
and records its id in the study (user attr ``mlflow_parent_run``); every other worker reads it
from there (see :func:`tracking.optuna_mlflow.open_study_parent`).

**Verdict.** When the study is complete (the last worker to finish), the best blend and
target-only are re-run in exact mode on ``calib_set`` 0..verdict_sets-1, evaluated on the
target language only (``eval_tokens``, the objective's tasks). The per-set differences
(positive = blend better) give a mean and a 95% paired t-interval; the answer is ``yes`` if
the interval excludes 0 in favour of the blend, ``no`` if in favour of target-only, else
``inconclusive``. If the best blend found is target-only itself, the best *non-target* blend
is re-run against it instead (the question is whether any non-target blend beats
target-only; a fast-mode ranking alone is no evidence either way).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import socket
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState
from tqdm.auto import tqdm

from pipeline import models, stages
from pipeline.config import (
    OBJECTIVES_LOWER,
    STUDY,
    STUDY_TASKS,
    TRIAL,
    Config,
    format_blend,
    split_list,
    tagged,
)
from pipeline.errors import LangpruneError
from jobs.main import check_inputs, preflight, run_main
from pipeline.models import DenseSnapshot
from pipeline.engine.blend import (
    STATS_FORMAT,
    LanguageStats,
    collect_language_stats,
    load_stats,
    prune_from_stats,
    save_stats,
)
from pipeline.pruners import PRUNERS, SparsityTarget, pruner_from_config, target_from_config
from tracking import optuna_mlflow as OM
from tracking import params as P
from tracking import runs as R

log = logging.getLogger(__name__)

PARAM_PREFIX = "w_"  # Optuna param name of a language's raw weight
DEFAULT_STORAGE_FILE = "optuna.db"
CONFIDENCE = 0.95
HEARTBEAT_S = 60  # a running trial writes a heartbeat this often ...
GRACE_S = 180  # ... and is failed as stale by the next worker after this long without one
STORAGE_ATTEMPTS = 4  # tries to open the storage (schema creation races between workers)
ENQUEUE_WAIT_S = 30.0  # how long a joining worker waits for the creator without progress
WORKER_ATTR = "worker"  # trial user attr: host:pid of the worker running it
CONFIG_ATTR = "langprune_config"  # study user attr: the config the study was created with
SLOTS_ATTR = "langprune_slots"  # study user attr: trials enqueued (set after enqueuing them)
# Trials that count towards n_trials: everything started (WAITING = enqueued, not started).
_STARTED = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)


class TrialFailure(Exception):
    """An expected trial failure (NaN objective, missing metric): recorded, never fatal."""


class NoSlotLeft(Exception):
    """Raised instead of creating a trial nobody enqueued: the study's slots are all taken."""


class SlotStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage that only creates *enqueued* trials.

    ``study.optimize`` first takes a WAITING trial (atomically) and creates a fresh one only
    when none is left; several workers that all saw "one trial missing" would then each
    create one and overshoot ``n_trials``. Here that fresh trial is refused
    (:class:`NoSlotLeft`), so the enqueued slots bound the study exactly.
    ``_create_new_trial`` is the one method both the plain and Optuna's cached storage call
    (optuna is pinned; the scale-out test exercises it).
    """

    def _create_new_trial(self, study_id: int, template_trial: Any = None) -> Any:
        if template_trial is None:
            raise NoSlotLeft("every enqueued trial of the study is taken")
        return super()._create_new_trial(study_id, template_trial)


# ---- objective ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Objective:
    """What a trial optimises: one metric of the target language or a weighted mix.

    Attributes:
        terms: ``{'ppl': 1.0}``, ``{'sib200': 1.0}`` or a mix such as
            ``{'ppl': 0.5, 'sib200': 10.0}``.
        target: The target language.
    """

    terms: Mapping[str, float]
    target: str

    @staticmethod
    def lower_is_better(term: str) -> bool:
        """The direction table: perplexity and bits per byte down, every task score up."""
        return term in OBJECTIVES_LOWER

    @property
    def direction(self) -> str:
        if len(self.terms) == 1:
            return "minimize" if self.lower_is_better(next(iter(self.terms))) else "maximize"
        return "minimize"  # the signed mix (module docstring)

    @property
    def tasks(self) -> list[str]:
        """lm-eval tasks the objective needs (bundled suites or task names)."""
        return sorted({t.split(".")[0] for t in self.terms if t not in OBJECTIVES_LOWER})

    def metric_key(self, term: str) -> str:
        """The evaluation metric a term reads: ``ppl.sw``, ``sib200.sw``, ``arc_easy.acc``."""
        if term in OBJECTIVES_LOWER or "." not in term:
            return f"{term}.{self.target}"
        return term

    def value(self, metrics: Mapping[str, float]) -> float:
        """The objective from a run's metrics.

        Raises:
            TrialFailure: a metric is missing or the value is not finite.
        """
        parts = {}
        for term in self.terms:
            key = self.metric_key(term)
            if key not in metrics:
                raise TrialFailure(f"objective metric {key!r} missing from the evaluation")
            parts[term] = float(metrics[key])
        if len(parts) == 1:
            value = next(iter(parts.values()))
        else:
            value = math.fsum(w * (1.0 if self.lower_is_better(t) else -1.0) * parts[t]
                              for t, w in self.terms.items())
        if not math.isfinite(value):
            shown = ", ".join(f"{k}={v}" for k, v in parts.items())
            raise TrialFailure(f"objective is {value} ({shown})")
        return value

    def validate(self) -> None:
        """Check every task term before any heavy work (bundled data for the target, etc.)."""
        from pipeline.evaluate.lm_eval_runner import BUNDLED, validate_tasks

        for term in self.terms:
            if term in OBJECTIVES_LOWER:
                continue
            if "." not in term and term not in BUNDLED:
                raise LangpruneError(
                    f"objective term {term!r}: name the metric of a non-bundled task, e.g. "
                    f"{term}.acc (bundled suites: {', '.join(BUNDLED)}; or ppl, bpb)"
                )
            plan = validate_tasks([term.split(".")[0]], [self.target])
            if plan.skipped:
                raise LangpruneError(
                    f"objective {term!r} has no bundled data for {self.target}; choose another "
                    "objective or target_lang"
                )


# ---- the simplex ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BlendPoint:
    """One point of the search space and the calibration it stands for.

    Attributes:
        raw: The sampled raw weights in [0, 1], one per pool language.
        weights: ``raw`` normalised to sum 1 (uniform when all raw weights are 0).
        counts: Calibration windows per language (largest remainder; zeros dropped).
        n_samples: Total windows.
    """

    raw: dict[str, float]
    weights: dict[str, float]
    counts: dict[str, int]
    n_samples: int

    @property
    def effective(self) -> dict[str, float]:
        """The blend actually calibrated on: ``counts / n_samples``."""
        return {lang: c / self.n_samples for lang, c in self.counts.items()}

    @property
    def label(self) -> str:
        """Canonical ``calib_blend`` string of the effective blend."""
        return format_blend(self.effective)

    @property
    def short(self) -> str:
        """Window counts for run names, e.g. ``de12+sw20``."""
        return "+".join(f"{lang}{c}" for lang, c in self.counts.items())

    def is_only(self, lang: str) -> bool:
        return set(self.counts) == {lang}

    def params(self) -> dict[str, str]:
        """MLflow params: ``calib_blend``, raw and normalised weights, window counts."""
        out = {"calib_blend": self.label, "calib_windows": self.short}
        for lang in self.raw:
            out[f"weight_raw.{lang}"] = repr(float(self.raw[lang]))
            out[f"weight.{lang}"] = repr(float(self.weights[lang]))
            out[f"windows.{lang}"] = str(self.counts.get(lang, 0))
        return out


def param_name(lang: str) -> str:
    return f"{PARAM_PREFIX}{lang}"


def blend_from_raw(raw: Mapping[str, float], n_samples: int) -> BlendPoint:
    """Normalise raw weights to a blend and round it to window counts.

    Raises:
        LangpruneError: a weight is negative or not finite, or ``raw`` is empty.
    """
    from pipeline.data.sampler import largest_remainder

    if not raw:
        raise LangpruneError("the language pool is empty")
    for lang, w in raw.items():
        if not (math.isfinite(w) and w >= 0):
            raise LangpruneError(f"raw weight of {lang} must be finite and >= 0, got {w}")
    total = math.fsum(raw.values())
    if total > 0:
        weights = {lang: w / total for lang, w in raw.items()}
    else:  # the limit of equal raw weights: every cube point is a valid blend
        weights = {lang: 1.0 / len(raw) for lang in raw}
    counts = largest_remainder(weights, n_samples)
    return BlendPoint(dict(raw), weights, {k: c for k, c in counts.items() if c > 0}, n_samples)


def suggest_blend(trial: optuna.Trial, pool: Sequence[str], n_samples: int) -> BlendPoint:
    """Sample one raw weight in [0, 1] per pool language and build the blend."""
    raw = {lang: trial.suggest_float(param_name(lang), 0.0, 1.0) for lang in pool}
    return blend_from_raw(raw, n_samples)


def single(pool: Sequence[str], lang: str) -> dict[str, float]:
    """Raw weights of the single-language blend ``{lang: 1}``."""
    return {p: 1.0 if p == lang else 0.0 for p in pool}


def corner(pool: Sequence[str], lang: str) -> dict[str, float]:
    """Optuna params of the single-language blend ``{lang: 1}``."""
    return {param_name(p): w for p, w in single(pool, lang).items()}


# ---- the search's shared state -----------------------------------------------------------------


@dataclass
class _Search:
    """What every trial of one worker needs (kept out of module scope)."""

    cfg: Config
    objective: Objective
    pool: list[str]
    study_name: str
    exp_id: str
    parent: R.TrackedRun
    logger: OM.TrialLogger
    loaded: Any = None
    snapshot: DenseSnapshot | None = None
    stats: dict[str, LanguageStats] = field(default_factory=dict)
    current_trial: int | None = None

    @property
    def sparsity_target(self) -> SparsityTarget:
        return target_from_config(self.cfg.prune)

    def eval_cfg(self, tokens: int) -> Config:
        """Target language only, ``tokens`` perplexity tokens, the objective's tasks."""
        return self.cfg.replace(eval_langs=self.objective.target, eval_tokens=tokens,
                                tasks=",".join(self.objective.tasks))


def search_pool(cfg: Config) -> list[str]:
    """The candidate languages, sorted; the target is added when missing (trial 0 needs it)."""
    pool = split_list(cfg.search.languages)
    if len(set(pool)) != len(pool):
        raise LangpruneError(f"languages names a language twice: {cfg.search.languages}")
    if cfg.search.target_lang not in pool:
        log.warning("target_lang %s added to the language pool", cfg.search.target_lang)
        pool.append(cfg.search.target_lang)
    return sorted(pool)


def default_study_name(cfg: Config) -> str:
    s = cfg.search
    return s.study_name or f"blend-{s.target_lang}-{cfg.prune.method}-{s.objective}-{s.mode}"


def storage_url(cfg: Config) -> str:
    """The Optuna storage URL; ``postgresql://`` is pinned to psycopg2 (what is installed)."""
    url = cfg.search.storage or f"sqlite:///{(Path.cwd() / DEFAULT_STORAGE_FILE).resolve()}"
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def safe_url(url: str) -> str:
    """The URL without its password, for logs and tags."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def _validate(cfg: Config) -> tuple[Objective, list[str], str]:
    """Everything checkable before the tracking store, the storage or the model."""
    if not PRUNERS.get(cfg.prune.method).needs_calibration:
        calibrated = [m for m in PRUNERS.names() if PRUNERS.get(m).needs_calibration]
        raise LangpruneError(
            f"method {cfg.prune.method} uses no calibration data, so every blend prunes the same; "
            f"search with one of: {', '.join(calibrated)}"
        )
    name = default_study_name(cfg)
    if any(c in name for c in "'\"`\\"):
        raise LangpruneError(f"study_name must not contain quotes or backslashes: {name!r}")
    objective = Objective(dict(cfg.search.objective_terms), cfg.search.target_lang)
    objective.validate()
    return objective, search_pool(cfg), storage_url(cfg)


# ---- the study -------------------------------------------------------------------------------


def study_config(cfg: Config, pool: Sequence[str], objective: Objective) -> dict[str, str]:
    """The config a study's trials depend on; a resumed study must have the same."""
    flat = cfg.to_flat()
    keys = tagged(STUDY) + (tagged(STUDY_TASKS) if objective.tasks else ())
    return {**{k: flat[k] for k in keys}, "languages": ",".join(pool)}


def open_study(cfg: Config, objective: Objective, pool: Sequence[str], url: str,
               make_parent: Callable[[], str] | None = None) -> optuna.Study:
    """Create or load the study, check it matches this config, enqueue its trial slots.

    Args:
        make_parent: Called only by the worker that creates the study, before any slot is
            enqueued; returns the MLflow parent run id, stored as the study's user attr
            :data:`tracking.optuna_mlflow.PARENT_ATTR` (one parent however many workers).
    """
    name = default_study_name(cfg)
    study, created = _create_study(cfg, name, objective.direction, url)
    if not created:
        _wait_provisioned(study)
    if study.direction.name.lower() != objective.direction:
        raise LangpruneError(f"study {name} {study.direction.name.lower()}s, but objective "
                             f"{cfg.search.objective} needs {objective.direction}")
    _check_study_config(study, study_config(cfg, pool, objective))
    if created and make_parent is not None:
        study.set_user_attr(OM.PARENT_ATTR, make_parent())
    fail_orphaned_trials(study)
    _enqueue_fixed(study, cfg, pool, created)
    _enqueue_slots(study, cfg.search.n_trials)
    return study


def _wait_provisioned(study: optuna.Study, n_trials: int = 0) -> None:
    """Wait for the worker that enqueues the slots to mark the study (:data:`SLOTS_ATTR`,
    at least ``n_trials`` when given).

    The wait ends early only if that worker makes no progress (no new trial or study attr)
    for :data:`ENQUEUE_WAIT_S`: then it died in between, or an older version created the
    study, and this worker enqueues what is missing itself.
    """
    seen: tuple[int, int] = (-1, -1)
    deadline = time.monotonic() + ENQUEUE_WAIT_S
    while time.monotonic() < deadline:
        attrs = study.user_attrs
        if SLOTS_ATTR in attrs and int(attrs[SLOTS_ATTR]) >= n_trials:
            return
        progress = (len(study.get_trials(deepcopy=False)), len(attrs))
        if progress != seen:
            seen, deadline = progress, time.monotonic() + ENQUEUE_WAIT_S
        time.sleep(0.5)
    log.warning("study %s: its creator enqueued no trials for %.0f s; enqueuing them here",
                study.study_name, ENQUEUE_WAIT_S)


def fail_orphaned_trials(study: optuna.Study) -> list[int]:
    """Fail the RUNNING trials whose worker on this host is gone; returns their numbers.

    A worker killed with SIGKILL (or by the OOM killer) cannot fail its own trial. Optuna's
    heartbeat fails it only after :data:`GRACE_S` and only from inside ``optimize``; until then
    the trial counts as started and blocks the verdict. A trial records its worker
    (``host:pid``) first thing, so a restarted worker on the same host fails it at once (a
    recycled pid is told apart by the process start time). Trials of other hosts are left
    to the heartbeat. The trial's MLflow run was already ended FAILED by the stale-run reaper.
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
            # Trial(study, id) is Optuna's handle on a stored trial (FrozenTrial has no setter)
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


def _create_study(cfg: Config, name: str, direction: str,
                  url: str) -> tuple[optuna.Study, bool]:
    """Create or load the study; ``(study, created_here)``.

    Retried, because workers starting together on a new database race to create its schema
    (the loser sees a unique-constraint error once). Creating a study is atomic (its name is
    unique), which elects the one worker that enqueues the fixed trials.
    """
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = SlotStorage(
                    url, engine_kwargs=_engine_kwargs(url), heartbeat_interval=HEARTBEAT_S,
                    grace_period=GRACE_S)
            if url.startswith("sqlite"):
                _serialise_sqlite(storage.engine)
            sampler = optuna.samplers.TPESampler(seed=cfg.run.seed)
            try:
                return optuna.create_study(study_name=name, storage=storage, sampler=sampler,
                                           direction=direction), True
            except optuna.exceptions.DuplicatedStudyError:
                return optuna.load_study(study_name=name, storage=storage, sampler=sampler), False
        except ImportError as e:
            raise LangpruneError(
                f"storage {safe_url(url)}: missing database driver ({e})") from None
        except Exception as e:  # SQLAlchemy/Optuna raise many types for a bad or dead database
            if attempt == STORAGE_ATTEMPTS - 1:
                raise LangpruneError(f"cannot open Optuna storage {safe_url(url)}: "
                                     f"{str(e).splitlines()[0][:300]}") from None
            log.info("opening %s failed (%s); retrying", safe_url(url), type(e).__name__)
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def _engine_kwargs(url: str) -> dict[str, Any]:
    # Several processes share one SQLite file: wait for its lock instead of failing at once.
    return {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}


def _serialise_sqlite(engine: Any) -> None:
    """Make every SQLite transaction ``BEGIN IMMEDIATE`` (SQLAlchemy's pysqlite recipe).

    Python's sqlite3 starts a transaction only at the first write, so two workers could both
    read a slot as WAITING and both take it (``SELECT ... FOR UPDATE`` is a no-op on SQLite).
    Taking the write lock at BEGIN serialises them, as the row lock does on PostgreSQL.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_conn: Any, record: Any) -> None:
        dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)

    @event.listens_for(engine, "begin")
    def _begin_immediate(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners existed


def _check_study_config(study: optuna.Study, mine: dict[str, str]) -> None:
    theirs = study.user_attrs.get(CONFIG_ATTR)
    if theirs is None:
        study.set_user_attr(CONFIG_ATTR, mine)
        return
    diff = [f"{k}={theirs.get(k)!r} (now {v!r})" for k, v in mine.items() if theirs.get(k) != v]
    if diff:
        raise LangpruneError(f"study {study.study_name} was created with another config: "
                             f"{'; '.join(diff)}. Use another study_name or the same config")


def _enqueue_fixed(study: optuna.Study, cfg: Config, pool: Sequence[str], created: bool) -> None:
    """Trial 0 = target-only; optionally every single-language blend.

    The worker that created the study enqueues them. Another worker that still finds the study
    empty after :func:`_wait_provisioned` enqueues them itself (the creator died in between);
    ``skip_if_exists`` keeps resumed studies from getting them twice.
    """
    target = cfg.search.target_lang
    if created or not study.get_trials(deepcopy=False):
        study.enqueue_trial(corner(pool, target), user_attrs={"role": "target-only"},
                            skip_if_exists=True)
    if cfg.search.enqueue_single:
        for lang in pool:
            if lang != target:
                study.enqueue_trial(corner(pool, lang), user_attrs={"role": f"single-{lang}"},
                                    skip_if_exists=True)


def _enqueue_slots(study: optuna.Study, n_trials: int) -> None:
    """Enqueue empty trials until the study holds ``n_trials``; then mark it provisioned.

    An empty enqueued trial has no fixed params: the sampler suggests all of them when a
    worker takes it. Workers take only enqueued trials (:class:`SlotStorage`).

    Counting and enqueuing are two steps, so two workers topping the study up at once (both
    started with a raised ``n_trials``) would both enqueue the missing slots. One worker is
    elected per target count: the one that creates the side study ``<name>--slots-<n>``
    (creation is atomic). The others wait until the study is marked with ``n`` slots; if the
    elected worker makes no progress for :data:`ENQUEUE_WAIT_S` (it died), they enqueue the
    rest themselves.
    """
    have = len(study.get_trials(deepcopy=False))
    if have < n_trials:
        side = f"{study.study_name}--slots-{n_trials}"
        try:
            study._storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], side)
        except optuna.exceptions.DuplicatedStudyError:
            _wait_provisioned(study, n_trials)
            have = len(study.get_trials(deepcopy=False))
        for _ in range(n_trials - have):
            study.enqueue_trial({})
    if int(study.user_attrs.get(SLOTS_ATTR, 0)) < n_trials:
        study.set_user_attr(SLOTS_ATTR, max(have, n_trials))


def started_trials(study: optuna.Study) -> int:
    """Trials that count towards ``n_trials`` (running, complete, failed, pruned)."""
    return len(study.get_trials(deepcopy=False, states=_STARTED))


def _sampler(seed: int, study: optuna.Study) -> optuna.samplers.BaseSampler:
    """TPE seeded from the seed and the study's progress (module docstring, "workers")."""
    trials = study.get_trials(deepcopy=False)
    others = any(t.state == TrialState.RUNNING for t in trials)
    started = sum(t.state != TrialState.WAITING for t in trials)  # all slots are enqueued
    key = f"{seed}:{started}:{os.getpid() if others else 0}"
    return optuna.samplers.TPESampler(
        seed=int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little"))


# ---- trials ----------------------------------------------------------------------------------


def _objective_fn(ctx: _Search) -> Callable[[optuna.Trial], float]:
    """The thin objective: blend from the trial, one prune + evaluation, the objective value."""
    n = ctx.cfg.calib.n_samples

    def objective(trial: optuna.Trial) -> float:
        ctx.current_trial = trial.number
        # first: a restarted worker fails this trial at once if this process dies
        trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
        point = suggest_blend(trial, ctx.pool, n)
        trial.set_user_attr(OM.BLEND_ATTR, point.label)
        trial.set_user_attr(OM.TARGET_ONLY_ATTR, point.is_only(ctx.objective.target))
        run = ctx.logger.start(trial, f"trial-{trial.number}-{point.short}", point.params())
        try:
            if ctx.cfg.search.mode == "fast":
                metrics = _fast_trial(ctx, point)
            else:
                metrics = _exact_trial(ctx, point, run, trial.number)
            run.log_metrics(metrics)
            return ctx.objective.value(metrics)
        except BaseException as e:  # interrupts too: the reason is set while still running
            trial.set_user_attr(OM.FAIL_ATTR, _first_line(e))
            raise
        finally:
            ctx.snapshot.restore()

    return objective


def _fast_trial(ctx: _Search, point: BlendPoint) -> dict[str, float]:
    loaded, cfg = ctx.loaded, ctx.cfg
    t0 = time.perf_counter()
    sparsity = prune_from_stats(
        loaded.model, ctx.stats, point.counts, pruner_from_config(cfg.prune),
        ctx.sparsity_target, device=loaded.device, offload=cfg.model.offload)
    prune_s = time.perf_counter() - t0
    report = stages.evaluate(ctx.eval_cfg(cfg.search.search_eval_tokens), loaded.model,
                             loaded.tokenizer, loaded.device, loaded.max_length, progress=False)
    return {**report.metrics(), "sparsity.actual": sparsity, "time.prune_s": prune_s}


def _exact_trial(ctx: _Search, point: BlendPoint, run: R.TrackedRun,
                 number: int) -> dict[str, float]:
    cell = ctx.cfg.replace(calib_blend=point.label)
    res = run_main(cell, "search", parent_run_id=run.run_id, loaded=ctx.loaded, check=False,
                   extra_tags={OM.TAG_STUDY: ctx.study_name, OM.TAG_TRIAL: str(number)})
    run.set_tags({"langprune.pruned_run": res.run_id, P.TAG_REUSED: str(res.reused).lower()})
    return dict(res.metrics)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


def run_trials(study: optuna.Study, ctx: _Search, n_trials: int, progress: bool = True) -> int:
    """Run trials until the study has started ``n_trials`` in total; returns how many ran here.

    A failing trial is recorded (state FAIL, user attr ``fail_reason``, its run FAILED) and
    the next one starts. An interrupt fails the running trial, ends its run KILLED, re-raises.
    """
    objective = _objective_fn(ctx)
    ran = 0
    bar = tqdm(total=n_trials, initial=min(started_trials(study), n_trials), desc="trials",
               disable=not progress)
    with bar:
        while started_trials(study) < n_trials:
            study.sampler = _sampler(ctx.cfg.run.seed, study)
            ctx.current_trial = None
            try:
                study.optimize(objective, n_trials=1, catch=(Exception,),
                               callbacks=[ctx.logger], gc_after_trial=False)
            except NoSlotLeft:  # other workers took the last slots
                break
            except BaseException:
                _abandon_current(study, ctx)
                raise
            ran += 1
            bar.n = min(started_trials(study), n_trials)
            bar.refresh()
    return ran


def _abandon_current(study: optuna.Study, ctx: _Search) -> None:
    """Fail this worker's running trial after an interrupt (best effort)."""
    if ctx.current_trial is None:
        return
    try:
        if study.trials[ctx.current_trial].state == TrialState.RUNNING:
            study.tell(ctx.current_trial, state=TrialState.FAIL)
        frozen = study.trials[ctx.current_trial]  # Optuna fails it itself on Ctrl-C
        run_id = frozen.user_attrs.get(OM.RUN_ID_ATTR)
        if run_id and R.client().get_run(run_id).info.status == "RUNNING":
            OM.end_trial_run(R.TrackedRun(run_id), frozen, killed=True)
    except Exception as e:
        log.error("could not mark interrupted trial %s failed: %s", ctx.current_trial, e)


def study_complete(study: optuna.Study, n_trials: int) -> bool:
    """All ``n_trials`` started and none still running (the verdict may run)."""
    trials = study.get_trials(deepcopy=False)
    return (started_trials(study) >= n_trials
            and not any(t.state == TrialState.RUNNING for t in trials))


# ---- fast-mode statistics for every pool language ----------------------------------------------


def _stats_path(ctx: _Search, lang: str, manifest: Mapping[str, Any], kind: str) -> Path:
    """Cache file of one language's statistics: keyed by windows, model, dtype and code."""
    from pipeline.paths import cache_dir

    key = {"format": STATS_FORMAT, "kind": kind, "model": ctx.cfg.model.model,
           "source": ctx.loaded.source, "n_params": ctx.loaded.n_params,
           "dtype": ctx.cfg.model.dtype, "windows": manifest["windows_sha256"],
           "code": P.code_version()[2]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    folder = cache_dir(ctx.cfg.model.model_cache) / "search-stats"
    return folder / f"{lang}-{kind}-{digest}.safetensors"


def language_stats(ctx: _Search, progress: bool = True) -> dict[str, LanguageStats]:
    """Statistics of every pool language's ``n_samples`` windows (cached on disk)."""
    cfg, loaded = ctx.cfg, ctx.loaded
    pruner = pruner_from_config(cfg.prune)
    kind = pruner.statistic.__name__ if pruner.statistic is not None else "none"
    out: dict[str, LanguageStats] = {}
    for lang in tqdm(ctx.pool, desc=f"{kind} statistics", disable=not progress):
        calib = stages.calibrate(cfg.replace(calib_lang=lang, calib_blend=""), loaded.tokenizer)
        path = _stats_path(ctx, lang, calib.manifest, kind)
        cached = load_stats(path, loaded.device)
        if cached is not None:
            log.info("%s: statistics from cache %s", lang, path)
            out[lang] = cached
            continue
        t0 = time.perf_counter()
        out[lang] = collect_language_stats(
            loaded.model, calib.windows, lang, pruner, device=loaded.device,
            batch_size=cfg.prune.capture_batch_size, offload=cfg.model.offload)
        log.info("%s: statistics of %d windows in %.1f s", lang, calib.windows.shape[0],
                 time.perf_counter() - t0)
        try:
            save_stats(out[lang], path)
        except OSError as e:  # the cache is an optimisation only
            log.warning("could not cache statistics at %s: %s", path, e)
    return out


# ---- verdict ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """Best blend versus target-only over several calibration sets.

    Attributes:
        target: Target language.
        answer: ``yes``, ``no`` or ``inconclusive``.
        statement: The one-line verdict that is printed and logged.
        detail: Mean difference, interval and sets in words.
        best_blend: The effective best blend.
        diffs: Per set, improvement of the blend over target-only (positive = blend better).
        mean: Mean of ``diffs``.
        ci_low: Lower end of the 95% paired t-interval.
        ci_high: Upper end.
        t_quantile: The t quantile used.
        pairs: Per set: values, run ids, or the error.
    """

    target: str
    answer: str
    statement: str
    detail: str
    best_blend: str
    diffs: list[float]
    mean: float
    ci_low: float
    ci_high: float
    t_quantile: float
    pairs: list[dict[str, Any]]


def paired_interval(diffs: Sequence[float],
                    confidence: float = CONFIDENCE) -> tuple[float, float, float, float]:
    """``(mean, low, high, t_quantile)`` of a paired t-interval; NaNs for fewer than 2."""
    k = len(diffs)
    if k < 2:
        return (diffs[0] if diffs else math.nan), math.nan, math.nan, math.nan
    from scipy import stats as st

    mean = statistics.fmean(diffs)
    tq = float(st.t.ppf(0.5 + confidence / 2, k - 1))
    half = tq * statistics.stdev(diffs) / math.sqrt(k)
    return mean, mean - half, mean + half, tq


def decide(low: float, high: float) -> str:
    """``yes`` if the interval lies above 0 (blend better), ``no`` below, else inconclusive."""
    if low > 0:
        return "yes"
    if high < 0:
        return "no"
    return "inconclusive"


def make_verdict(target: str, best_blend: str, diffs: Sequence[float],
                 pairs: list[dict[str, Any]], objective: str) -> Verdict:
    """Turn per-set improvements of the best blend into the verdict."""
    mean, low, high, tq = paired_interval(diffs)
    answer = decide(low, high) if len(diffs) >= 2 else "inconclusive"
    detail = (f"best blend {best_blend}: mean improvement over target-only {mean:+.4g} "
              f"({objective}; positive = blend better), 95% CI [{low:.4g}, {high:.4g}], "
              f"paired t over {len(diffs)} calibration sets")
    return Verdict(target, answer,
                   f"a non-target blend beats target-only for {target}: {answer}", detail,
                   best_blend, list(diffs), mean, low, high, tq, pairs)


def _verdict_value(ctx: _Search, point: BlendPoint, calib_set: int,
                   role: str) -> tuple[float, str]:
    cell = ctx.eval_cfg(ctx.cfg.eval.eval_tokens).replace(calib_blend=point.label,
                                                          calib_set=calib_set)
    try:
        res = run_main(cell, "search", parent_run_id=ctx.parent.run_id, loaded=ctx.loaded,
                       check=False, extra_tags={OM.TAG_STUDY: ctx.study_name,
                                                "langprune.verdict_role": role})
    finally:
        ctx.snapshot.restore()
    return ctx.objective.value(res.metrics), res.run_id


def challenger(study: optuna.Study, pool: Sequence[str], target: str,
               n_samples: int) -> tuple[BlendPoint | None, bool]:
    """The blend the verdict re-runs against target-only: the best completed trial whose
    effective blend is not target-only, and whether it is also the study's best trial.

    When the search's best is target-only itself, the best *non-target* blend is still
    re-run: the question is whether any non-target blend beats target-only, and a fast-mode
    ranking alone is not evidence either way.
    """
    done = [t for t in study.trials if t.state == TrialState.COMPLETE and t.value is not None
            and all(param_name(lang) in t.params for lang in pool)]
    if not done:
        return None, False
    sign = 1.0 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1.0
    done.sort(key=lambda t: (sign * t.value, t.number))
    for rank, trial in enumerate(done):
        point = blend_from_raw({lang: trial.params[param_name(lang)] for lang in pool}, n_samples)
        if not point.is_only(target):
            return point, rank == 0
    return None, False


def run_verdict(ctx: _Search, study: optuna.Study) -> Verdict:
    """Re-run the best non-target blend and target-only in exact mode over ``verdict_sets``."""
    target, n = ctx.objective.target, ctx.cfg.calib.n_samples
    best, is_best = challenger(study, ctx.pool, target, n)
    if best is None:
        v = make_verdict(target, "", [], [], ctx.cfg.search.objective)
        return Verdict(**{**asdict(v), "detail": "no completed non-target blend to re-run"})
    if not is_best:
        log.info("the search's best blend is target-only; re-running the best non-target "
                 "blend %s against it", best.label)
    only = blend_from_raw(single(ctx.pool, target), n)
    sign = 1.0 if ctx.objective.direction == "minimize" else -1.0
    diffs, pairs = [], []
    for k in range(ctx.cfg.search.verdict_sets):
        try:
            b, b_run = _verdict_value(ctx, best, k, "blend")
            t, t_run = _verdict_value(ctx, only, k, "target-only")
        except Exception as e:  # one failed set must not lose the others
            log.error("verdict set %d failed: %s", k, e)
            pairs.append({"calib_set": k, "error": _first_line(e)})
            continue
        diffs.append(sign * (t - b))
        pairs.append({"calib_set": k, "blend": b, "target_only": t, "improvement": diffs[-1],
                      "blend_run": b_run, "target_only_run": t_run})
    verdict = make_verdict(target, best.label, diffs, pairs, ctx.cfg.search.objective)
    if is_best:
        return verdict
    return dataclasses.replace(verdict, detail="the search's best blend was target-only; "
                               "re-ran the best non-target blend. " + verdict.detail)


def log_verdict(parent: R.TrackedRun, verdict: Verdict) -> None:
    parent.set_tags({"langprune.verdict": verdict.answer,
                     "langprune.verdict_text": verdict.statement,
                     "langprune.verdict_detail": verdict.detail[:5000]})
    parent.log_metrics({"verdict.mean_improvement": verdict.mean,
                        "verdict.ci_low": verdict.ci_low, "verdict.ci_high": verdict.ci_high,
                        "verdict.sets": len(verdict.diffs)})
    parent.log_json(asdict(verdict), "verdict/verdict.json")


# ---- the entry point ---------------------------------------------------------------------------


@dataclass
class SearchResult:
    """What :func:`run_search` did (for callers and tests)."""

    study_name: str
    storage: str
    parent_run_id: str
    trials_run: int
    summary: OM.StudySummary
    verdict: Verdict | None


def _base_tags_params(cfg: Config, name: str) -> tuple[dict[str, str], dict[str, str]]:
    tags = {**P.run_tags(cfg, "trial", "pending", "search"), OM.TAG_STUDY: name,
            OM.TAG_MODE: cfg.search.mode}
    tags[P.TAG_HASH] = "trial-" + cfg.config_hash()  # never taken for a reusable pruned run
    flat = cfg.to_flat()
    return tags, {k: flat[k] for k in tagged(TRIAL)}


def _parent_params(cfg: Config, name: str, pool: Sequence[str],
                   objective: Objective) -> dict[str, str]:
    """The parent's params: what the study computes (fixed for its life, checked on resume).

    Per-invocation settings (n_trials, device, storage URL, ...) go into tags instead:
    MLflow params are write-once and workers may differ in them.
    """
    fixed = study_config(cfg, pool, objective)
    fixed.pop("languages")
    # The resolved name goes to ``study``: ``study_name`` is a config key, and under `mlflow run`
    # MLflow has already logged the raw value ('' for the default) as that param.
    return {**fixed, "study": name, "search_pool": ",".join(pool)}


def run_search(cfg: Config, *, progress: bool = True) -> SearchResult:
    """Run (or resume, or join) the blend search for ``cfg.search.target_lang``; print the verdict.

    Cheap checks come first (objective, pool, tracking store, storage), then the model loads.
    """
    objective, pool, url = _validate(cfg)
    exp_id = preflight(cfg, inputs=False)
    # the fast-mode statistics read n_samples windows of every pool language
    probe = check_inputs(cfg, [cfg.replace(calib_lang=lang, calib_blend="").calib
                               for lang in pool], [objective.target])
    if probe is not None:
        _check_verdict_corpus(cfg, probe.tokenizer)
    name = default_study_name(cfg)
    tags = {**P.run_tags(cfg, "search", "pending", "search"), OM.TAG_MODE: cfg.search.mode,
            P.TAG_HASH: "search-" + cfg.config_hash()}
    study = open_study(cfg, objective, pool, url,
                       make_parent=lambda: OM.create_study_parent(exp_id, name, tags))
    parent, worker = OM.open_study_parent(exp_id, name, tags,
                                          study.user_attrs.get(OM.PARENT_ATTR))
    trial_tags, trial_params = _base_tags_params(cfg, name)
    ctx = _Search(cfg, objective, pool, name, exp_id, parent,
                  OM.TrialLogger(parent, exp_id, trial_tags, trial_params))
    with R.run_guard(parent):
        parent.log_params(_parent_params(cfg, name, pool, objective))
        parent.set_tags({"langprune.n_trials_target": str(cfg.search.n_trials),
                         "langprune.study_storage": safe_url(url)})
        ran, verdict = _search_body(ctx, study, progress)
        summary = OM.summarise_study(study)
        if verdict is not None:
            parent.finish(state="complete")
        elif not OM.parent_complete(parent):  # never undo the verdict of a faster worker
            parent.finish(state="incomplete")
    if worker is not None:
        worker.set_tags({"langprune.trials_run": str(ran)})
        worker.finish()
    _print_result(name, url, summary, verdict, cfg)
    return SearchResult(name, safe_url(url), parent.run_id, ran, summary, verdict)


def _search_body(ctx: _Search, study: optuna.Study,
                 progress: bool) -> tuple[int, Verdict | None]:
    """Trials (model and fast statistics loaded only if any are due), summary, figures and,
    when the study is complete, the verdict."""
    cfg = ctx.cfg
    ran = 0
    if started_trials(study) < cfg.search.n_trials:
        _load_model(ctx)
        if cfg.search.mode == "fast":
            ctx.stats = language_stats(ctx, progress)
        ran = run_trials(study, ctx, cfg.search.n_trials, progress)
    OM.log_summary(ctx.parent, OM.summarise_study(study), step=len(study.trials))
    OM.log_study_plots(ctx.parent, study)
    if not study_complete(study, cfg.search.n_trials):
        log.info("other workers still run trials of %s; the last to finish runs the verdict",
                 ctx.study_name)
        return ran, None
    if not claim_verdict(study):
        log.info("another worker runs the verdict of %s", ctx.study_name)
        return ran, None
    if ctx.loaded is None:
        _load_model(ctx)
    verdict = run_verdict(ctx, study)
    log_verdict(ctx.parent, verdict)
    return ran, verdict


VERDICT_ATTR = "langprune_verdict"  # study user attr: host:pid:claim_ms of the verdict's worker


def claim_verdict(study: optuna.Study) -> bool:
    """Elect the one worker that runs the verdict of a complete study.

    Creating a study is atomic (unique name), so the worker that creates the side study
    ``<name>--verdict`` wins; the others skip the verdict. The winner records itself as
    ``host:pid:claim time`` in the study; a worker restarted on the same host takes over when that
    process is gone and the parent has no verdict yet (a killed verdict is re-run).
    """
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


def _load_model(ctx: _Search) -> None:
    from pipeline.loading import load_model, probe_model

    probe = probe_model(ctx.cfg.model)  # cached by the preflight: its tokenizer is reused
    ctx.loaded = load_model(ctx.cfg.model, probe.tokenizer if probe is not None else None)
    stages.check_model_fits(ctx.cfg, ctx.loaded.max_length)
    _check_verdict_corpus(ctx.cfg, ctx.loaded.tokenizer)
    ctx.snapshot = DenseSnapshot(ctx.loaded.model)
    ctx.parent.set_tags({P.TAG_DEVICE: str(ctx.loaded.device)})


def _check_verdict_corpus(cfg: Config, tokenizer: Any) -> None:
    """The verdict's target-only runs need ``verdict_sets`` disjoint sets: fail before trials."""
    from pipeline.data.sampler import available_windows

    s, c = cfg.search, cfg.calib
    have = available_windows(tokenizer, c.calib_source, s.target_lang, c.seq_len)
    if have < s.verdict_sets * c.n_samples:
        raise LangpruneError(
            f"{c.calib_source}/{s.target_lang} holds {have} windows of {c.seq_len} tokens; the "
            f"verdict needs verdict_sets x n_samples = {s.verdict_sets * c.n_samples}: lower "
            "verdict_sets, n_samples or seq_len"
        )


def _print_result(name: str, url: str, summary: OM.StudySummary, verdict: Verdict | None,
                  cfg: Config) -> None:
    print(f"study {name} ({safe_url(url)}): {summary.n_complete} trials complete, "
          f"{summary.n_failed} failed")
    if summary.best_trial >= 0:
        print(f"best trial {summary.best_trial}: {summary.best_blend} "
              f"({cfg.search.objective} {summary.best_value:.4g}); target-only "
              f"{summary.target_only_value:.4g}; improvement {summary.improvement:+.4g} "
              f"(run {summary.best_run})")
    if verdict is not None:
        print(verdict.statement)
        print(verdict.detail)
