"""Paired comparisons of calibration rows on the same documents and windows.

For a group of runs (a method, at one sparsity), a metric (``ppl`` or a task) and an
evaluation language L with a same-language calibration row, the target row (calibrated on L)
is compared with every other row on the units both were evaluated on: task documents
(aligned by ``task, lang, doc_id``) or perplexity windows (``lang, window``). Documents or
windows only one side has are dropped and counted, never mixed in.

One calibration set per row: tasks use :func:`analysis.paired.paired_accuracy` (Newcombe's
interval), perplexity :func:`analysis.paired.paired_perplexity` (ratio, paired bootstrap).
Rows with several calibration sets use :func:`analysis.paired.cluster_paired_bootstrap` over
[set, unit] matrices (sets paired by index; rows whose set indices differ are averaged over
their sets first and bootstrapped over units only). Perplexity from that bootstrap is the
exponential of the mean per-token NLL of a window, and its comparison a ratio likewise.
A task whose dense accuracy interval includes chance is "uninformative" (no verdict).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from analysis import paired as P
from analysis import stats as S
from pipeline.errors import LangpruneError

DOC_KEYS = ("task", "lang", "doc_id")
WINDOW_KEYS = ("lang", "window")
Frames = Mapping[int, pd.DataFrame]  # calibration set -> that run's records


@dataclass(frozen=True)
class Paired:
    """Row a against row b on their shared units.

    Attributes:
        a, b: Each row's score on the shared units with its interval.
        comparison: a - b (tasks) or a / b (perplexity); its verdict is said of a.
        n: Shared units; dropped: units only one side had.
    """

    a: S.Interval
    b: S.Interval
    comparison: S.Comparison
    n: int
    dropped: int


@dataclass(frozen=True)
class Case:
    """The target row against the best other row for one evaluation language.

    Attributes:
        metric: ``ppl`` or a task name.
        lang: The evaluation (= target calibration) language.
        other_row: The best other calibration row by point estimate ("" if none).
        paired: Target vs that row (None without another row).
        verdict: better / worse / indistinguishable, or "uninformative".
        vs_dense: Target vs the dense run (None without dense records).
        dense: The dense run's score with its interval (None without records).
        chance: The task's chance accuracy (NaN for perplexity).
    """

    metric: str
    lang: str
    other_row: str
    paired: Paired | None
    verdict: str
    vs_dense: S.Comparison | None = None
    dense: S.Interval | None = None
    chance: float = math.nan


def records_for(records: pd.DataFrame | None, runs: pd.DataFrame, metric: str,
                lang: str) -> dict[str, dict[int, pd.DataFrame]]:
    """Calibration row -> calibration set -> that run's records of ``metric`` in ``lang``.

    Args:
        records: Stacked per-document (tasks) or per-window (``ppl``) records with run ids.
        runs: The group's runs (``run_id``, ``calib_lang``, ``calib_set``).
        metric: ``ppl`` or a task name.
        lang: The evaluation language.
    """
    if records is None:
        return {}
    sel = records[records["lang"] == lang]
    if metric != "ppl":
        sel = sel[sel["task"] == metric]
    out: dict[str, dict[int, pd.DataFrame]] = {}
    for run in runs.itertuples():
        frame = sel[sel["run_id"] == run.run_id]
        if len(frame):
            out.setdefault(str(run.calib_lang), {})[int(run.calib_set)] = frame
    return out


def _keys(metric: str) -> list[str]:
    return list(WINDOW_KEYS if metric == "ppl" else DOC_KEYS)


def _common(frames: Sequence[pd.DataFrame], keys: list[str]) -> tuple[list[pd.DataFrame], int]:
    """Every frame restricted to the units all share (same order), and how many were dropped."""
    first = frames[0]
    for other in frames[1:]:  # validates keys and duplicates; narrows to the shared units
        first = P.align_documents(first, other, keys, mode="common").a
    index = pd.MultiIndex.from_frame(first[keys])
    union = pd.MultiIndex.from_frame(pd.concat([f[keys] for f in frames]).drop_duplicates())
    out = [f[pd.MultiIndex.from_frame(f[keys]).isin(index)].sort_values(keys, kind="stable")
           .reset_index(drop=True) for f in frames]
    return out, len(union) - len(index)


def _unit_scores(frame: pd.DataFrame, metric: str) -> np.ndarray:
    if metric == "ppl":
        return (frame["nll_sum"] / frame["n_tokens"]).to_numpy(dtype=float)
    return frame["correct"].to_numpy(dtype=float)


def _as_score(c: S.Comparison, metric: str) -> S.Comparison:
    """A mean-NLL comparison as a perplexity ratio (exp); accuracy differences unchanged."""
    if metric != "ppl":
        return c
    return replace(c, estimate=math.exp(c.estimate), low=math.exp(c.low),
                   high=math.exp(c.high), null=1.0)


def _mean_interval(matrix: np.ndarray, metric: str, sets: bool) -> S.Interval:
    """The mean over [set, unit] cells with its two-level (or unit-only) bootstrap interval."""
    c = P.cluster_paired_bootstrap(matrix, np.zeros_like(matrix), higher_is_better=True,
                                   resample_sets=sets)
    c = _as_score(c, metric)
    return S.Interval(c.estimate, c.low, c.high, c.confidence, c.method, c.n)


def single_interval(frame: pd.DataFrame, metric: str) -> S.Interval:
    """One run's score on its records: Wilson (tasks) or window bootstrap (perplexity)."""
    if metric == "ppl":
        return S.perplexity_interval(frame["nll_sum"], frame["n_tokens"])
    return S.accuracy_interval(frame["correct"].astype(bool))


def row_interval(frames: Frames, metric: str) -> S.Interval:
    """A calibration row's score over its sets (common units) with its interval."""
    if len(frames) == 1:
        return single_interval(next(iter(frames.values())), metric)
    aligned, _ = _common([frames[k] for k in sorted(frames)], _keys(metric))
    return _mean_interval(np.stack([_unit_scores(f, metric) for f in aligned]), metric, True)


def point(frames: Frames, metric: str) -> float:
    """A row's point estimate on all its records: the mean over sets of each run's score."""
    values = []
    for frame in frames.values():
        if metric == "ppl":
            values.append(math.exp(frame["nll_sum"].sum() / frame["n_tokens"].sum()))
        else:
            values.append(float(frame["correct"].mean()))
    return float(np.mean(values))


def _paired_single(a: pd.DataFrame, b: pd.DataFrame, metric: str) -> Paired:
    al = P.align_documents(a, b, _keys(metric), mode="common")
    dropped = al.dropped_a + al.dropped_b
    if metric == "ppl":
        pp = P.paired_perplexity(al.a["nll_sum"], al.b["nll_sum"], al.a["n_tokens"])
        return Paired(pp.ppl_a, pp.ppl_b, pp.ratio, al.n_common, dropped)
    pa = P.paired_accuracy(al.a["correct"].astype(bool), al.b["correct"].astype(bool))
    return Paired(single_interval(al.a, metric), single_interval(al.b, metric), pa.difference,
                  al.n_common, dropped)


def compare(a: Frames, b: Frames, metric: str) -> Paired:
    """Row a against row b on their shared units (see the module docstring for the method).

    Args:
        a, b: Calibration set -> records of each row.
        metric: ``ppl`` or a task name (higher accuracy / lower perplexity is better).
    """
    if len(a) == 1 and len(b) == 1:
        return _paired_single(next(iter(a.values())), next(iter(b.values())), metric)
    sets = sorted(set(a) & set(b))
    paired_sets = len(sets) >= 2 and len(sets) == len(a) == len(b)
    keys_a, keys_b = (sets, sets) if paired_sets else (sorted(a), sorted(b))
    aligned, dropped = _common([a[k] for k in keys_a] + [b[k] for k in keys_b], _keys(metric))
    scores = np.stack([_unit_scores(f, metric) for f in aligned])
    ma, mb = scores[:len(keys_a)], scores[len(keys_a):]
    if not paired_sets:  # sets not paired by index: compare set averages, units resampled
        ma, mb = ma.mean(axis=0, keepdims=True), mb.mean(axis=0, keepdims=True)
    c = P.cluster_paired_bootstrap(ma, mb, higher_is_better=metric != "ppl",
                                   resample_sets=paired_sets)
    if not paired_sets:
        c = replace(c, n_sets=max(len(a), len(b)))
    return Paired(_mean_interval(ma, metric, paired_sets), _mean_interval(mb, metric, paired_sets),
                  _as_score(c, metric), scores.shape[1], dropped)


def dense_informative(dense: pd.DataFrame | None, task: str, lang: str
                      ) -> tuple[bool, S.Interval | None, float]:
    """Whether the dense model is above chance on ``task`` in ``lang`` (True if unknown).

    Returns:
        (informative, the dense accuracy interval or None, the chance accuracy or NaN).
    """
    if dense is None:
        return True, None, math.nan
    docs = dense[(dense["task"] == task) & (dense["lang"] == lang)]
    if docs.empty:
        return True, None, math.nan
    chance = float(np.mean(1.0 / docs["n_choices"].to_numpy(dtype=float)))
    k, n = int(docs["correct"].astype(bool).sum()), len(docs)
    return S.is_informative(k, n, chance), single_interval(docs, task), chance


def versus_dense(target: Frames, dense: pd.DataFrame | None, metric: str) -> S.Comparison | None:
    """Target row against the dense run (its records repeated for every calibration set)."""
    if dense is None:
        return None
    sel = dense[dense["lang"] == next(iter(target.values()))["lang"].iloc[0]]
    if metric != "ppl":
        sel = sel[sel["task"] == metric]
    if sel.empty:
        return None
    return compare(target, {k: sel for k in target}, metric).comparison


@dataclass(frozen=True)
class Column:
    """One evaluation language of a matrix, compared row by row with its target row.

    Attributes:
        lang: The evaluation language.
        intervals: Calibration row -> its score with interval on its own records.
        versus_target: Other row -> target row against it (same units).
        case: The target against the best other row (None without a target row).
    """

    lang: str
    intervals: Mapping[str, S.Interval]
    versus_target: Mapping[str, Paired]
    case: Case | None


def column(records: pd.DataFrame | None, dense: pd.DataFrame | None, runs: pd.DataFrame,
           metric: str, lang: str) -> Column:
    """Intervals of every row in ``lang``, and the target row against each other row.

    Args:
        records: Stacked per-document or per-window records of the runs (None: none logged).
        dense: The dense run's records (None if not logged).
        runs: The group's runs (one method at one sparsity).
        metric: ``ppl`` or a task name.
        lang: The evaluation language.
    """
    rows = records_for(records, runs, metric, lang)
    intervals = {row: row_interval(frames, metric) for row, frames in sorted(rows.items())}
    if lang not in rows:
        return Column(lang, intervals, {}, None)
    target = rows[lang]
    versus = {}
    for row, frames in sorted(rows.items()):
        if row == lang:
            continue
        try:
            versus[row] = compare(target, frames, metric)
        except LangpruneError:  # no shared document or window: nothing to pair, no verdict
            continue
    usable = {row: frames for row, frames in rows.items() if row == lang or row in versus}
    return Column(lang, intervals, versus, _case(usable, dense, metric, lang, versus))


def _case(rows: Mapping[str, Frames], dense: pd.DataFrame | None, metric: str, lang: str,
          versus: Mapping[str, Paired]) -> Case:
    informative, dense_ival, chance = (True, None, math.nan)
    if metric != "ppl":
        informative, dense_ival, chance = dense_informative(dense, metric, lang)
    elif dense is not None and not (sel := dense[dense["lang"] == lang]).empty:
        dense_ival = single_interval(sel, metric)
    others = {row: point(frames, metric) for row, frames in rows.items() if row != lang}
    sign = 1.0 if metric == "ppl" else -1.0  # best = lowest perplexity, highest accuracy
    best = min(sorted(others), key=lambda r: sign * others[r]) if others else ""
    paired = versus.get(best)
    verdict = "uninformative" if not informative else (
        paired.comparison.verdict if paired else "")
    return Case(metric, lang, best, paired, verdict, versus_dense(rows[lang], dense, metric),
                dense_ival, chance)


def cases(columns: Sequence[Column]) -> list[Case]:
    """The target-vs-best-other cases of the columns that have a target row."""
    return [c.case for c in columns if c.case is not None]


def verdicts(found: Sequence[Case]) -> list[str]:
    """The cases' verdicts for :func:`analysis.stats.headline` (cases without another row
    are left out)."""
    return [c.verdict for c in found if c.verdict]
