"""The trials of one worker: the objective, fast and exact trials, the fast-mode statistics.

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

The statistics (:mod:`pipeline.engine.blend`) are cached in memory and on disk (safetensors
under the model cache, keyed by the windows' sha256, model and code version), so a restarted
or second worker on the same host skips the shared pass.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from jobs.artifacts import interval_metrics
from jobs.main import run_main
from jobs.search.objective import Objective
from jobs.search.space import BlendPoint, suggest_blend
from pipeline import stages
from pipeline.config import Config
from pipeline.engine.blend import (
    STATS_FORMAT,
    LanguageStats,
    collect_language_stats,
    load_stats,
    prune_from_stats,
    save_stats,
)
from pipeline.models import DenseSnapshot
from pipeline.pruners import SparsityTarget, pruner_from_config, target_from_config
from tracking import optuna_mlflow as OM
from tracking import optuna_storage as OS
from tracking import optuna_workers as OW
from tracking import params as P
from tracking import runs as R
from tracking.logging import log_records

log = logging.getLogger(__name__)

# The evaluation text the trials are scored on; the verdict scores the other half.
SELECTION, VERDICT = "selection", "verdict"


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
    current_run: R.TrackedRun | None = None  # the running trial's run (fast trials log to it)

    @property
    def sparsity_target(self) -> SparsityTarget:
        return target_from_config(self.cfg.prune)

    def eval_cfg(self, tokens: int, part: str = SELECTION) -> Config:
        """Target language only, ``tokens`` perplexity tokens of the text ``part``, the
        objective's tasks. Trials score the selection half; the verdict the other."""
        return self.cfg.replace(eval_langs=self.objective.target, eval_tokens=tokens,
                                tasks=",".join(self.objective.tasks), eval_part=part)


# ---- one trial -------------------------------------------------------------------------------


def _objective_fn(ctx: _Search) -> Callable[[optuna.Trial], float]:
    """The thin objective: blend from the trial, one prune + evaluation, the objective value."""
    n = ctx.cfg.calib.n_samples

    def objective(trial: optuna.Trial) -> float:
        ctx.current_trial = trial.number
        OW.record_worker(trial)  # first: a restarted worker fails it if this process dies
        point = suggest_blend(trial, ctx.pool, n)
        trial.set_user_attr(OM.BLEND_ATTR, point.label)
        trial.set_user_attr(OM.TARGET_ONLY_ATTR, point.is_only(ctx.objective.target))
        run = ctx.logger.start(trial, f"trial-{trial.number}-{point.short}", point.params())
        ctx.current_run = run
        try:
            if ctx.cfg.search.mode == "fast":
                metrics = _fast_trial(ctx, point)
            else:
                metrics = _exact_trial(ctx, point, run, trial.number)
            run.log_metrics(metrics)
            return ctx.objective.value(metrics)
        except BaseException as e:  # interrupts too: the reason is set while still running
            trial.set_user_attr(OM.FAIL_ATTR, first_line(e))
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
    if ctx.current_run is not None:  # per-document / per-window records, as every run has
        log_records(ctx.current_run, report)
    return {**report.metrics(), **interval_metrics(report, cfg.run.seed),
            "sparsity.actual": sparsity, "time.prune_s": prune_s}


def _exact_trial(ctx: _Search, point: BlendPoint, run: R.TrackedRun,
                 number: int) -> dict[str, float]:
    cell = ctx.cfg.replace(calib_blend=point.label, eval_part=SELECTION)
    res = run_main(cell, "search", parent_run_id=run.run_id, loaded=ctx.loaded, check=False,
                   extra_tags={OM.TAG_STUDY: ctx.study_name, OM.TAG_TRIAL: str(number)})
    run.set_tags({"langprune.pruned_run": res.run_id, P.TAG_REUSED: str(res.reused).lower()})
    return dict(res.metrics)


def first_line(e: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters), for fail reasons."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


# ---- the loop --------------------------------------------------------------------------------


def run_trials(study: optuna.Study, ctx: _Search, n_trials: int, progress: bool = True) -> int:
    """Run trials until the study has started ``n_trials`` in total; returns how many ran here.

    A failing trial is recorded (state FAIL, user attr ``fail_reason``, its run FAILED) and
    the next one starts. An interrupt fails the running trial, ends its run KILLED, re-raises.
    """
    objective = _objective_fn(ctx)
    ran = 0
    bar = tqdm(total=n_trials, initial=min(OS.started_trials(study), n_trials), desc="trials",
               disable=not progress)
    with bar:
        while OS.started_trials(study) < n_trials:
            study.sampler = OS.seeded_sampler(ctx.cfg.run.seed, study)
            ctx.current_trial = None
            try:
                study.optimize(objective, n_trials=1, catch=(Exception,),
                               callbacks=[ctx.logger], gc_after_trial=False)
            except OS.NoSlotLeft:  # other workers took the last slots
                break
            except BaseException:
                _abandon_current(study, ctx)
                raise
            ran += 1
            bar.n = min(OS.started_trials(study), n_trials)
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
