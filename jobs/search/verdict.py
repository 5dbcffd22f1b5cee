"""The verdict: does the best blend beat target-only calibration?

When the study is complete (the last worker to finish), the best blend and target-only are
re-run in exact mode on fresh data: ``verdict_sets`` calibration sets none of which is the
search's ``calib_set`` (:func:`verdict_calib_sets`; params ``search_calib_set`` and
``verdict_calib_sets``), evaluated on the target language only (``eval_tokens``, the
objective's tasks) on the second half of the evaluation sentences, while every trial scored
the first half (``eval_part``; param ``verdict_eval_text``). So neither the calibration
windows nor the text the blend was picked on is evidence in its confirmation. The per-set
differences (positive = blend better)
give a mean and a 95% paired t-interval; the answer is ``yes`` if the interval excludes 0 in
favour of the blend, ``no`` if in favour of target-only, else ``inconclusive``. If the best
blend found is target-only itself, the best *non-target* blend is re-run against it instead
(the question is whether any non-target blend beats target-only; a fast-mode ranking alone is
no evidence either way).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from jobs.main import run_main
from jobs.search.space import BlendPoint, blend_from_raw, param_name, single
from jobs.search.trials import VERDICT, _Search, first_line
from tracking import optuna_mlflow as OM
from tracking import runs as R

log = logging.getLogger(__name__)

CONFIDENCE = 0.95


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
        documents: For a single-task objective, the comparison paired over calibration sets
            and documents (``jobs.search.doc_pairing``), which then decides ``answer``.
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
    documents: dict[str, Any] | None = None  # task objectives: pairing over sets x documents


# ---- the arithmetic ------------------------------------------------------------------------


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


# ---- the re-runs ---------------------------------------------------------------------------


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


def verdict_calib_sets(search_set: int, n_sets: int) -> list[int]:
    """The ``n_sets`` lowest calibration sets other than the search's own."""
    return [k for k in range(n_sets + 1) if k != search_set][:n_sets]


def check_verdict_corpora(ctx: _Search, blends: Sequence[BlendPoint]) -> None:
    """Every language of every re-run blend holds its windows for every verdict set.

    Raises:
        LangpruneError: before the first verdict run, naming the language and the need.
    """
    from pipeline.data.sampler import available_windows
    from pipeline.errors import LangpruneError

    c = ctx.cfg.calib
    last = max(verdict_calib_sets(c.calib_set, ctx.cfg.search.verdict_sets))
    for lang in sorted({lang for b in blends for lang in b.counts}):
        count = max(b.counts.get(lang, 0) for b in blends)
        have = available_windows(ctx.loaded.tokenizer, c.calib_source, lang, c.seq_len)
        if have < (last + 1) * count:
            raise LangpruneError(
                f"{c.calib_source}/{lang} holds {have} windows of {c.seq_len} tokens; the "
                f"verdict's calibration set {last} needs ({last}+1) x {count} = "
                f"{(last + 1) * count}: lower verdict_sets, n_samples or seq_len")


def _verdict_value(ctx: _Search, point: BlendPoint, calib_set: int,
                   role: str) -> tuple[float, str]:
    cell = ctx.eval_cfg(ctx.cfg.eval.eval_tokens, VERDICT).replace(calib_blend=point.label,
                                                                   calib_set=calib_set)
    try:
        res = run_main(cell, "search", parent_run_id=ctx.parent.run_id, loaded=ctx.loaded,
                       check=False, extra_tags={OM.TAG_STUDY: ctx.study_name,
                                                "langprune.verdict_role": role})
    finally:
        ctx.snapshot.restore()
    return ctx.objective.value(res.metrics), res.run_id


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
    check_verdict_corpora(ctx, [best, only])
    diffs, pairs = _paired_runs(ctx, best, only)
    verdict = _with_documents(ctx, make_verdict(target, best.label, diffs, pairs,
                                                ctx.cfg.search.objective))
    if is_best:
        return verdict
    return dataclasses.replace(verdict, detail="the search's best blend was target-only; "
                               "re-ran the best non-target blend. " + verdict.detail)


def _with_documents(ctx: _Search, verdict: Verdict) -> Verdict:
    """For a single-task objective: the answer from the pairing over sets and documents."""
    from jobs.search.doc_pairing import paired_over_documents, task_of

    task = task_of(ctx.objective.terms)
    paired = (None if task is None else
              paired_over_documents(task, ctx.objective.target, verdict.pairs, ctx.cfg.run.seed))
    if paired is None:
        return verdict
    cmp, n_docs = paired
    answer = {"better": "yes", "worse": "no"}.get(cmp.verdict, "inconclusive")
    detail = (f"{verdict.detail}. Paired over {cmp.n_sets} calibration sets and {n_docs} "
              f"documents (two-level bootstrap): accuracy difference {cmp.estimate:+.3f}, "
              f"95% CI [{cmp.low:.3f}, {cmp.high:.3f}] ({cmp.verdict}); the answer follows it")
    return dataclasses.replace(
        verdict, answer=answer, detail=detail,
        statement=f"a non-target blend beats target-only for {verdict.target}: {answer}",
        documents={"n_docs": n_docs, "n_sets": cmp.n_sets, "difference": cmp.estimate,
                   "ci_low": cmp.low, "ci_high": cmp.high, "outcome": cmp.verdict})


def _paired_runs(ctx: _Search, best: BlendPoint,
                 only: BlendPoint) -> tuple[list[float], list[dict[str, Any]]]:
    """Per calibration set, the blend's improvement over target-only and the pair's record."""
    sign = 1.0 if ctx.objective.direction == "minimize" else -1.0
    diffs: list[float] = []
    pairs: list[dict[str, Any]] = []
    for k in verdict_calib_sets(ctx.cfg.calib.calib_set, ctx.cfg.search.verdict_sets):
        try:
            b, b_run = _verdict_value(ctx, best, k, "blend")
            t, t_run = _verdict_value(ctx, only, k, "target-only")
        except Exception as e:  # one failed set must not lose the others
            log.error("verdict set %d failed: %s", k, e)
            pairs.append({"calib_set": k, "error": first_line(e)})
            continue
        diffs.append(sign * (t - b))
        pairs.append({"calib_set": k, "blend": b, "target_only": t, "improvement": diffs[-1],
                      "blend_run": b_run, "target_only_run": t_run})
    return diffs, pairs


def log_verdict(parent: R.TrackedRun, verdict: Verdict) -> None:
    parent.set_tags({"langprune.verdict": verdict.answer,
                     "langprune.verdict_text": verdict.statement,
                     "langprune.verdict_detail": verdict.detail[:5000]})
    parent.log_metrics({"verdict.mean_improvement": verdict.mean,
                        "verdict.ci_low": verdict.ci_low, "verdict.ci_high": verdict.ci_high,
                        "verdict.sets": len(verdict.diffs)})
    parent.log_json(asdict(verdict), "verdict/verdict.json")
