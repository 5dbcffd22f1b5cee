"""Optuna RDB storage and the coordination of several workers on one study.

The MLflow side of a study lives in :mod:`tracking.optuna_mlflow`; this module knows nothing
of what a trial computes: callers pass plain values (the direction, the config a study
depends on, the fixed trials to enqueue, ``n_trials``, the seed).

**Workers.** ``n_trials`` is the *total* number of trials a study should have started
(running, complete, failed). The count is exact however many workers start at once: the
worker that creates the study (creation is atomic, so it is unique) enqueues every trial up
front as a *slot* (the fixed trials with their params, the others empty, so the sampler fills
them in) and then marks the study provisioned (user attr :data:`SLOTS_ATTR`); the others wait
for that mark (:func:`_wait_provisioned`). Workers only ever take an enqueued slot (an atomic
WAITING -> RUNNING update: ``SELECT ... FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on
SQLite) and never create a trial of their own (:class:`SlotStorage`), so trial numbers are
unique and dense and the total is ``n_trials``. Raising ``n_trials`` of an existing study tops
the slots up, exactly, even when several workers are started with the new count at once (one
is elected per count, :func:`_enqueue_slots`). The study records the config it was created with
and refuses a different one (:func:`_check_study_config`).

A killed worker's running trial is failed at once by the next worker started on the same host
(:func:`tracking.optuna_workers.fail_orphaned_trials`, run by :func:`open_study`), from other
hosts by Optuna's heartbeat after :data:`GRACE_S`. The sampler is TPE, seeded per trial from
``seed`` and the number of trials started so far (plus the pid when other workers are active),
so a resumed study does not replay its first trials and concurrent workers do not duplicate
each other (:func:`seeded_sampler`). When the study is complete, one worker is elected to run
what follows (:func:`tracking.optuna_workers.claim_verdict`). The bookkeeping of a worker's
own trials lives in :mod:`tracking.optuna_workers`.

Optuna's private API is used here in two places, each because the public one cannot do it
(optuna is pinned; the scale-out test, ``tests/e2e/test_scale_out.py``, exercises them):
``RDBStorage._create_new_trial`` (:class:`SlotStorage`); ``Study._storage``, to create the
side study that elects one worker in the storage already open (:func:`_enqueue_slots`; the
verdict's election does the same, :mod:`tracking.optuna_workers`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from pipeline.errors import LangpruneError
from tracking import optuna_mlflow as OM
from tracking.optuna_workers import fail_orphaned_trials

log = logging.getLogger(__name__)

DEFAULT_STORAGE_FILE = "optuna.db"
HEARTBEAT_S = 60  # a running trial writes a heartbeat this often ...
GRACE_S = 180  # ... and is failed as stale by the next worker after this long without one
STORAGE_ATTEMPTS = 4  # tries to open the storage (schema creation races between workers)
ENQUEUE_WAIT_S = 30.0  # how long a joining worker waits for the creator without progress
CONFIG_ATTR = "langprune_config"  # study user attr: the config the study was created with
SLOTS_ATTR = "langprune_slots"  # study user attr: trials enqueued (set after enqueuing them)
# Trials that count towards n_trials: everything started (WAITING = enqueued, not started).
_STARTED = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)


class NoSlotLeft(Exception):
    """Raised instead of creating a trial nobody enqueued: the study's slots are all taken."""


class SlotStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage that only creates *enqueued* trials.

    ``study.optimize`` first takes a WAITING trial (atomically) and creates a fresh one only
    when none is left; several workers that all saw "one trial missing" would then each
    create one and overshoot ``n_trials``. Here that fresh trial is refused
    (:class:`NoSlotLeft`), so the enqueued slots bound the study exactly.
    ``_create_new_trial`` (private) is the one method both the plain and Optuna's cached
    storage call, so it is the one place to refuse it (optuna is pinned; the scale-out test
    exercises it).
    """

    def _create_new_trial(self, study_id: int, template_trial: Any = None) -> Any:
        if template_trial is None:
            raise NoSlotLeft("every enqueued trial of the study is taken")
        return super()._create_new_trial(study_id, template_trial)


@dataclass(frozen=True)
class FixedTrial:
    """A trial enqueued with fixed params (e.g. the target-only blend) and its user attrs."""

    params: Mapping[str, float]
    user_attrs: Mapping[str, Any] = field(default_factory=dict)


# ---- URLs ------------------------------------------------------------------------------------


def storage_url(storage: str) -> str:
    """The Optuna storage URL of the ``storage`` setting (empty: ``optuna.db`` in the working
    directory); ``postgresql://`` is pinned to psycopg2 (what is installed)."""
    url = storage or f"sqlite:///{(Path.cwd() / DEFAULT_STORAGE_FILE).resolve()}"
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


# ---- opening a study ---------------------------------------------------------------------------


def open_study(name: str, url: str, *, direction: str, seed: int, config: Mapping[str, str],
               fixed: Sequence[FixedTrial], n_trials: int,
               make_parent: Callable[[], str] | None = None,
               objective: str = "") -> optuna.Study:
    """Create or load the study, check it matches ``config``, enqueue its trial slots.

    Args:
        direction: ``minimize`` or ``maximize``; a loaded study must have the same.
        seed: Seed of the sampler the study is created or loaded with.
        config: What the study's trials depend on (:func:`_check_study_config`).
        fixed: The fixed trials (:func:`_enqueue_fixed`; the first is trial 0).
        n_trials: Slots the study should hold (:func:`_enqueue_slots`).
        make_parent: Called only by the worker that creates the study, before any slot is
            enqueued; returns the MLflow parent run id, stored as the study's user attr
            :data:`tracking.optuna_mlflow.PARENT_ATTR` (one parent however many workers).
        objective: The objective's name, for the error on a direction mismatch.
    """
    study, created = _create_study(name, direction, url, seed)
    if not created:
        _wait_provisioned(study)
    if study.direction.name.lower() != direction:
        raise LangpruneError(f"study {name} {study.direction.name.lower()}s, but objective "
                             f"{objective} needs {direction}")
    _check_study_config(study, dict(config))
    if created and make_parent is not None:
        study.set_user_attr(OM.PARENT_ATTR, make_parent())
    fail_orphaned_trials(study)
    _enqueue_fixed(study, fixed, created)
    _enqueue_slots(study, n_trials)
    return study


def _create_study(name: str, direction: str, url: str,
                  seed: int) -> tuple[optuna.Study, bool]:
    """Create or load the study; ``(study, created_here)``.

    Retried, because workers starting together on a new database race to create its schema
    (the loser sees a unique-constraint error once). Creating a study is atomic (its name is
    unique), which elects the one worker that enqueues the fixed trials.
    """
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            return _create_or_load(name, direction, url, seed)
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


def _create_or_load(name: str, direction: str, url: str,
                    seed: int) -> tuple[optuna.Study, bool]:
    with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = SlotStorage(url, engine_kwargs=_engine_kwargs(url),
                              heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
    if url.startswith("sqlite"):
        _serialise_sqlite(storage.engine)
    sampler = optuna.samplers.TPESampler(seed=seed)
    try:
        return optuna.create_study(study_name=name, storage=storage, sampler=sampler,
                                   direction=direction), True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler), False


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
    """Record ``mine`` in a new study; refuse it if the study was created with another."""
    theirs = study.user_attrs.get(CONFIG_ATTR)
    if theirs is None:
        study.set_user_attr(CONFIG_ATTR, mine)
        return
    diff = [f"{k}={theirs.get(k)!r} (now {v!r})" for k, v in mine.items() if theirs.get(k) != v]
    if diff:
        raise LangpruneError(f"study {study.study_name} was created with another config: "
                             f"{'; '.join(diff)}. Use another study_name or the same config")


# ---- slots -------------------------------------------------------------------------------------


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


def _enqueue_fixed(study: optuna.Study, fixed: Sequence[FixedTrial], created: bool) -> None:
    """Enqueue the fixed trials: ``fixed[0]`` is trial 0, the others follow it.

    The worker that created the study enqueues them. Another worker that still finds the study
    empty after :func:`_wait_provisioned` enqueues trial 0 itself (the creator died in between);
    ``skip_if_exists`` keeps resumed studies from getting them twice.
    """
    if not fixed:
        return
    first, *rest = fixed
    if created or not study.get_trials(deepcopy=False):
        study.enqueue_trial(dict(first.params), user_attrs=dict(first.user_attrs),
                            skip_if_exists=True)
    for trial in rest:
        study.enqueue_trial(dict(trial.params), user_attrs=dict(trial.user_attrs),
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
            # study._storage (private; a Study has no public accessor): create the side study
            # in the storage already open rather than open a second engine on its URL
            study._storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], side)
        except optuna.exceptions.DuplicatedStudyError:
            _wait_provisioned(study, n_trials)
            have = len(study.get_trials(deepcopy=False))
        for _ in range(n_trials - have):
            study.enqueue_trial({})
    if int(study.user_attrs.get(SLOTS_ATTR, 0)) < n_trials:
        study.set_user_attr(SLOTS_ATTR, max(have, n_trials))


# ---- progress ----------------------------------------------------------------------------------


def started_trials(study: optuna.Study) -> int:
    """Trials that count towards ``n_trials`` (running, complete, failed, pruned)."""
    return len(study.get_trials(deepcopy=False, states=_STARTED))


def study_complete(study: optuna.Study, n_trials: int) -> bool:
    """All ``n_trials`` started and none still running (the verdict may run)."""
    trials = study.get_trials(deepcopy=False)
    return (started_trials(study) >= n_trials
            and not any(t.state == TrialState.RUNNING for t in trials))


def seeded_sampler(seed: int, study: optuna.Study) -> optuna.samplers.BaseSampler:
    """TPE seeded from the seed and the study's progress (module docstring, "workers")."""
    trials = study.get_trials(deepcopy=False)
    others = any(t.state == TrialState.RUNNING for t in trials)
    started = sum(t.state != TrialState.WAITING for t in trials)  # all slots are enqueued
    key = f"{seed}:{started}:{os.getpid() if others else 0}"
    return optuna.samplers.TPESampler(
        seed=int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little"))
