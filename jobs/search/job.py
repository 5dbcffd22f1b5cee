"""The search job: validate, open (or join) the study and its MLflow parent, run the trials,
the verdict when the study is complete, print the result.

**Studies, resume.** The study lives in RDB storage (``storage``, default
``sqlite:///optuna.db`` in the working directory) under ``study_name`` (default
``blend-<target>-<method>-<objective>-<mode>``), ``load_if_exists``. ``n_trials`` is the
*total* number of trials the study should have started (running, complete, failed): a
restarted worker runs only the missing ones, several workers stop together when the study
reaches it. How workers share a study exactly (slots, elections, orphaned trials, seeding) is
the part of :mod:`tracking.optuna_storage` and :mod:`tracking.optuna_workers`.

All trial runs of all workers are children of one MLflow parent run. The study's creator
creates it (under ``mlflow run`` it adopts the run MLflow created) before it enqueues the slots
and records its id in the study (user attr ``mlflow_parent_run``); every other worker reads it
from there (see :func:`tracking.optuna_mlflow.open_study_parent`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna

from jobs.main import check_inputs, preflight
from jobs.search.objective import Objective
from jobs.search.space import corner, search_pool
from jobs.search.trials import _Search, language_stats, run_trials
from jobs.search.verdict import Verdict, log_verdict, run_verdict, verdict_calib_sets
from pipeline import stages
from pipeline.config import STUDY, STUDY_TASKS, TRIAL, Config, tagged
from pipeline.errors import LangpruneError
from pipeline.models import DenseSnapshot
from pipeline.pruners import PRUNERS
from tracking import optuna_mlflow as OM
from tracking import optuna_storage as OS
from tracking import optuna_workers as OW
from tracking import params as P
from tracking import runs as R

if TYPE_CHECKING:
    from pipeline.loading import ModelProbe

log = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """What :func:`run_search` did (for callers and tests)."""

    study_name: str
    storage: str
    parent_run_id: str
    trials_run: int
    summary: OM.StudySummary
    verdict: Verdict | None


# ---- checks and names --------------------------------------------------------------------------


def default_study_name(cfg: Config) -> str:
    s = cfg.search
    return s.study_name or f"blend-{s.target_lang}-{cfg.prune.method}-{s.objective}-{s.mode}"


def _validate(cfg: Config) -> tuple[Objective, list[str], str]:
    """Everything checkable before the tracking store, the storage or the model."""
    if not PRUNERS.get(cfg.prune.method).needs_calibration:
        calibrated = [m for m in PRUNERS.names() if PRUNERS.get(m).needs_calibration]
        raise LangpruneError(
            f"method {cfg.prune.method} uses no calibration data, so every blend prunes the same; "
            f"search with one of: {', '.join(calibrated)}"
        )
    if cfg.search.mode == "fast" and cfg.prune.layer_sparsity != "uniform":
        raise LangpruneError(
            f"layer_sparsity={cfg.prune.layer_sparsity} needs the pruned model's own pre-pass; "
            "fast mode prunes from cached dense statistics: use mode=exact")
    name = default_study_name(cfg)
    if any(c in name for c in "'\"`\\"):
        raise LangpruneError(f"study_name must not contain quotes or backslashes: {name!r}")
    objective = Objective(dict(cfg.search.objective_terms), cfg.search.target_lang)
    objective.validate()
    return objective, search_pool(cfg), OS.storage_url(cfg.search.storage)


def _check_verdict_corpus(cfg: Config, tokenizer: Any) -> None:
    """The verdict's target-only runs need ``verdict_sets`` disjoint sets: fail before trials."""
    from pipeline.data.sampler import available_windows

    s, c = cfg.search, cfg.calib
    have = available_windows(tokenizer, c.calib_source, s.target_lang, c.seq_len)
    need = (max(verdict_calib_sets(c.calib_set, s.verdict_sets)) + 1) * c.n_samples
    if have < need:
        raise LangpruneError(
            f"{c.calib_source}/{s.target_lang} holds {have} windows of {c.seq_len} tokens; the "
            f"verdict's target-only runs on calibration sets "
            f"{verdict_calib_sets(c.calib_set, s.verdict_sets)} need {need}: lower "
            "verdict_sets, n_samples or seq_len"
        )


# ---- the study ---------------------------------------------------------------------------------


def study_config(cfg: Config, pool: Sequence[str], objective: Objective) -> dict[str, str]:
    """The config a study's trials depend on; a resumed study must have the same."""
    flat = cfg.to_flat()
    keys = tagged(STUDY) + (tagged(STUDY_TASKS) if objective.tasks else ())
    return {**{k: flat[k] for k in keys}, "languages": ",".join(pool)}


def fixed_trials(cfg: Config, pool: Sequence[str]) -> list[OS.FixedTrial]:
    """Trial 0 = target-only; with ``enqueue_single`` every other single-language blend."""
    target = cfg.search.target_lang
    fixed = [OS.FixedTrial(corner(pool, target), {"role": "target-only"})]
    if cfg.search.enqueue_single:
        fixed += [OS.FixedTrial(corner(pool, lang), {"role": f"single-{lang}"})
                  for lang in pool if lang != target]
    return fixed


def open_study(cfg: Config, objective: Objective, pool: Sequence[str], url: str,
               make_parent: Callable[[], str] | None = None) -> optuna.Study:
    """Create or load the study, check it matches this config, enqueue its trial slots
    (:func:`tracking.optuna_storage.open_study`; ``make_parent`` is documented there)."""
    return OS.open_study(
        default_study_name(cfg), url, direction=objective.direction, seed=cfg.run.seed,
        config=study_config(cfg, pool, objective), fixed=fixed_trials(cfg, pool),
        n_trials=cfg.search.n_trials, make_parent=make_parent,
        objective=cfg.search.objective)


# ---- runs' tags and params ---------------------------------------------------------------------


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
    verdict_sets = verdict_calib_sets(cfg.calib.calib_set, cfg.search.verdict_sets)
    return {**fixed, "study": name, "search_pool": ",".join(pool),
            "search_calib_set": str(cfg.calib.calib_set),
            "verdict_calib_sets": ",".join(map(str, verdict_sets)),
            "verdict_eval_text": f"{cfg.eval.eval_source}: trials on the first half of the "
                                 "sentences, the verdict on the second (eval_part)"}


# ---- the entry point ---------------------------------------------------------------------------


def run_search(cfg: Config, *, progress: bool = True) -> SearchResult:
    """Run (or resume, or join) the blend search for ``cfg.search.target_lang``; print the verdict.

    Cheap checks come first (objective, pool, tracking store, storage), then the model loads.
    """
    objective, pool, url = _validate(cfg)
    exp_id, _ = preflight(cfg, inputs=False)
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
                         "langprune.study_storage": OS.safe_url(url)})
        ran, verdict = _search_body(ctx, study, progress, probe)
        summary = OM.summarise_study(study)
        if verdict is not None:
            parent.finish(state="complete")
        elif not OM.parent_complete(parent):  # never undo the verdict of a faster worker
            parent.finish(state="incomplete")
    if worker is not None:
        worker.set_tags({"langprune.trials_run": str(ran)})
        worker.finish()
    _print_result(name, url, summary, verdict, cfg)
    return SearchResult(name, OS.safe_url(url), parent.run_id, ran, summary, verdict)


def _search_body(ctx: _Search, study: optuna.Study, progress: bool,
                 probe: ModelProbe | None) -> tuple[int, Verdict | None]:
    """Trials (model and fast statistics loaded only if any are due), summary, figures and,
    when the study is complete, the verdict. ``probe`` is the one :func:`run_search`'s
    checks made; the model loads with its tokenizer."""
    cfg = ctx.cfg
    ran = 0
    if OS.started_trials(study) < cfg.search.n_trials:
        _load_model(ctx, probe)
        if cfg.search.mode == "fast":
            ctx.stats = language_stats(ctx, progress)
        ran = run_trials(study, ctx, cfg.search.n_trials, progress)
    OM.log_summary(ctx.parent, OM.summarise_study(study), step=len(study.trials))
    OM.log_study_plots(ctx.parent, study)
    if not OS.study_complete(study, cfg.search.n_trials):
        log.info("other workers still run trials of %s; the last to finish runs the verdict",
                 ctx.study_name)
        return ran, None
    if not OW.claim_verdict(study):
        log.info("another worker runs the verdict of %s", ctx.study_name)
        return ran, None
    if ctx.loaded is None:
        _load_model(ctx, probe)
    verdict = run_verdict(ctx, study)
    log_verdict(ctx.parent, verdict)
    return ran, verdict


def _load_model(ctx: _Search, probe: ModelProbe | None) -> None:
    from pipeline.loading import load_model

    ctx.loaded = load_model(ctx.cfg.model, probe.tokenizer if probe is not None else None)
    stages.check_model_fits(ctx.cfg, ctx.loaded.max_length)
    _check_verdict_corpus(ctx.cfg, ctx.loaded.tokenizer)
    ctx.snapshot = DenseSnapshot(ctx.loaded.model)
    ctx.parent.set_tags({P.TAG_DEVICE: str(ctx.loaded.device)})


def _print_result(name: str, url: str, summary: OM.StudySummary, verdict: Verdict | None,
                  cfg: Config) -> None:
    print(f"study {name} ({OS.safe_url(url)}): {summary.n_complete} trials complete, "
          f"{summary.n_failed} failed")
    if summary.best_trial >= 0:
        print(f"best trial {summary.best_trial}: {summary.best_blend} "
              f"({cfg.search.objective} {summary.best_value:.4g}); target-only "
              f"{summary.target_only_value:.4g}; improvement {summary.improvement:+.4g} "
              f"(run {summary.best_run}; selection values, single runs: the verdict's paired "
              "interval on fresh data is the comparison)")
    if verdict is not None:
        print(verdict.statement)
        print(verdict.detail)
    from jobs.console import ui_command

    print(f"to look at the study's runs: {ui_command()}")
