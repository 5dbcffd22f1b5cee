"""Paired comparisons of two runs on the same documents or windows, and their alignment.

Run a is compared with run b unit by unit (SCIENCE.md, "Uncertainty and comparisons"): paired
accuracies by Newcombe's interval with exact McNemar, perplexity ratios by a paired bootstrap
over windows, mean differences over calibration sets x documents by a two-level bootstrap, and
per-document outcomes paired on their keys first, never silently mixed. The intervals,
verdicts and defaults these build on live in :mod:`analysis.stats`; methods are explained in
docs/statistics.md. Every random draw comes from an explicitly seeded Generator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import stats as sps

from analysis.stats import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    Comparison,
    Interval,
    Seed,
    _as_binary,
    _as_float,
    _interval,
    _same_length,
    _weights,
    _z,
    classify,
    wilson_interval,
)
from pipeline.errors import LangpruneError


@dataclass(frozen=True)
class PairedAccuracy:
    """Two accuracies on the same documents, their difference and McNemar's exact test."""

    acc_a: float
    acc_b: float
    difference: Comparison  # acc_a - acc_b, Newcombe's paired interval
    a_only: int  # documents a got right and b got wrong
    b_only: int  # documents b got right and a got wrong
    mcnemar_p: float  # exact two-sided; 1.0 without discordant pairs


@dataclass(frozen=True)
class PairedPerplexity:
    """Two perplexities on the same windows and their ratio (lower is better)."""

    ppl_a: Interval
    ppl_b: Interval
    ratio: Comparison  # ppl_a / ppl_b, paired bootstrap over windows


@dataclass(frozen=True)
class Alignment:
    """Two runs' per-document rows restricted to shared documents, row i the same in both."""

    a: pd.DataFrame  # sorted by the keys, index reset
    b: pd.DataFrame
    n_common: int  # documents both runs were evaluated on
    dropped_a: int  # documents only run a had (0 in "refuse" mode)
    dropped_b: int  # documents only run b had


def paired_accuracy(
    correct_a: ArrayLike, correct_b: ArrayLike, *, confidence: float = DEFAULT_CONFIDENCE
) -> PairedAccuracy:
    """Compare two runs' accuracies on the same documents (aligned element by element).

    The interval of acc_a - acc_b is Newcombe's square-and-add interval for paired
    proportions (Newcombe 1998, method 10): both Wilson intervals combined with the estimated
    correlation of the paired outcomes. Chosen over a bootstrap over documents: closed-form,
    consistent with the per-run Wilson intervals, and it does not collapse when discordant
    pairs are few (with none, a bootstrap interval has width 0 and over-claims). McNemar's
    exact test (McNemar 1947) is reported alongside; the verdict follows the interval.

    Args:
        correct_a: Per-document outcomes of run a.
        correct_b: Per-document outcomes of run b, same documents in the same order.
        confidence: Confidence level.

    Returns:
        A :class:`PairedAccuracy`.
    """
    a, b = _as_binary(correct_a, "correct_a"), _as_binary(correct_b, "correct_b")
    _same_length(a, b, "documents")
    n = a.size
    both, a_only = int(np.sum(a & b)), int(np.sum(a & ~b))
    b_only, neither = int(np.sum(~a & b)), int(np.sum(~a & ~b))
    z = _z(confidence)
    p1, p2 = (both + a_only) / n, (both + b_only) / n
    l1, u1 = wilson_interval(both + a_only, n, z)
    l2, u2 = wilson_interval(both + b_only, n, z)
    phi = _newcombe_phi(both, a_only, b_only, neither)
    d1, d2 = p1 - l1, u2 - p2
    e1, e2 = u1 - p1, p2 - l2
    low = max(-1.0, p1 - p2 - math.sqrt(max(0.0, d1 * d1 - 2 * phi * d1 * d2 + d2 * d2)))
    high = min(1.0, p1 - p2 + math.sqrt(max(0.0, e1 * e1 - 2 * phi * e1 * e2 + e2 * e2)))
    verdict = classify(low, high, higher_is_better=True)
    diff = Comparison(p1 - p2, low, high, 0.0, True, verdict, "newcombe-paired", n, 1, confidence)
    discordant = a_only + b_only
    p = float(sps.binomtest(a_only, discordant, 0.5).pvalue) if discordant else 1.0
    return PairedAccuracy(p1, p2, diff, a_only, b_only, p)


def paired_perplexity(
    nll_a: ArrayLike,
    nll_b: ArrayLike,
    n_tokens: ArrayLike,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: Seed = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
) -> PairedPerplexity:
    """Compare two runs' perplexities on the same windows: ratio ppl_a / ppl_b.

    One set of bootstrap weights over windows serves both runs, so the ratio's interval
    reflects only how the runs differ window by window (paired bootstrap).

    Args:
        nll_a: Summed NLL (nats) per window for run a.
        nll_b: Summed NLL per window for run b, same windows in the same order.
        n_tokens: Predicted tokens per window (same tokenizer for both runs).
        resamples, seed, confidence: Bootstrap resamples, seed or Generator, level.

    Returns:
        A :class:`PairedPerplexity`; its ratio's verdict is said of a (lower is better).
    """
    a, b = _as_float(nll_a, "nll_a"), _as_float(nll_b, "nll_b")
    tok = _as_float(n_tokens, "n_tokens")
    _same_length(a, b, "windows")
    _same_length(a, tok, "windows")
    if tok.sum() <= 0:
        raise LangpruneError("perplexity over windows with no tokens")
    rng = np.random.default_rng(seed)
    boot = np.concatenate(
        [np.stack([w @ a, w @ b, w @ tok]) for w in _weights(rng, a.size, resamples)], axis=1
    )  # rows: sum nll_a, sum nll_b, sum tokens, per resample
    ppl = [
        _interval(math.exp(x.sum() / tok.sum()), np.exp(s / boot[2]), confidence, a.size)
        for x, s in ((a, boot[0]), (b, boot[1]))
    ]
    # exp of the NLL difference, not a quotient of exps: identical runs give exactly 1.0.
    value = math.exp((a.sum() - b.sum()) / tok.sum())
    ratio = _interval(value, np.exp((boot[0] - boot[1]) / boot[2]), confidence, a.size)
    return PairedPerplexity(ppl[0], ppl[1], _comparison(ratio, 1.0, False, "bootstrap-paired"))


def cluster_paired_bootstrap(
    scores_a: ArrayLike,
    scores_b: ArrayLike,
    *,
    higher_is_better: bool,
    resample_sets: bool = True,
    resamples: int = DEFAULT_RESAMPLES,
    seed: Seed = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Comparison:
    """Mean paired difference over calibration sets and documents, two-level bootstrap.

    ``scores_x[s, d]`` is the score of configuration x rerun with calibration set s on
    document (or window) d, e.g. 0/1 correctness or the mean per-token NLL of a window. Each
    resample draws set indices and document indices independently with replacement (a
    "pigeonhole" bootstrap, Owen 2007) and takes the mean of a - b over the drawn cells; a
    drawn set index takes row s of both a and b (paired by index, e.g. the same calibration
    seed; for unrelated sets this pairing changes nothing in expectation).

    Assumption: sets and documents are crossed, exchangeable draws from their populations
    (calibration sets of a language; evaluation documents). The interval is conservative: the
    set x document interaction is counted at both levels (up to ~sqrt(3) too wide when it
    dominates). With 3 sets the set level has only 10 distinct resamples: its width is rough.

    Args:
        scores_a: Matrix [sets, documents] for configuration a.
        scores_b: Matrix of the same shape for configuration b.
        higher_is_better: Direction of the score.
        resample_sets: False resamples documents only (the one-level paired bootstrap of the
            set-averaged difference), which ignores set-to-set variation.
        resamples, seed, confidence: Bootstrap resamples, seed or Generator, level.

    Returns:
        A :class:`Comparison` of mean(a - b) with ``n_sets`` set.
    """
    a, b = np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)
    if a.ndim != 2 or a.shape != b.shape or a.size == 0:
        raise LangpruneError(
            f"need two equal non-empty [sets, docs] matrices, got {a.shape} and {b.shape}"
        )
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise LangpruneError("scores contain NaN or infinite values")
    diff = a - b
    k, m = diff.shape
    rng = np.random.default_rng(seed)
    boot = []
    for wd in _weights(rng, m, resamples):
        ws = np.ones((len(wd), k))
        if resample_sets:
            ws = rng.multinomial(k, np.full(k, 1 / k), size=len(wd)).astype(float)
        boot.append((((ws / k) @ diff) * (wd / m)).sum(axis=1))
    ival = _interval(float(diff.mean()), np.concatenate(boot), confidence, m)
    method = "bootstrap-sets-docs" if resample_sets else "bootstrap-docs"
    return replace(_comparison(ival, 0.0, higher_is_better, method), n_sets=k)


def align_documents(
    frame_a: pd.DataFrame,
    frame_b: pd.DataFrame,
    keys: Sequence[str] = ("task", "lang", "doc_id"),
    mode: Literal["refuse", "common"] = "refuse",
) -> Alignment:
    """Pair two runs' per-document outcomes on the same documents, never silently mixing.

    Args:
        frame_a: Run a's outcomes, one row per document (columns ``keys``, correct, ...).
        frame_b: Run b's outcomes.
        keys: Columns identifying a document.
        mode: "refuse" raises unless both runs have exactly the same documents; "common"
            keeps the documents both have and reports how many each run lost.

    Returns:
        An :class:`Alignment` whose frames are sorted by ``keys``, row for row the same
        documents.

    Raises:
        LangpruneError: On a missing key column, a document listed twice in one run, an
            unknown mode, documents that differ in "refuse" mode, or no shared document.
    """
    if mode not in ("refuse", "common"):
        raise LangpruneError(f"align_documents mode must be 'refuse' or 'common', not {mode!r}")
    cols = list(keys)
    idx = []
    for name, f in (("a", frame_a), ("b", frame_b)):
        missing = [c for c in cols if c not in f.columns]
        if missing:
            raise LangpruneError(f"run {name} outcomes lack document key columns {missing}")
        ix = pd.MultiIndex.from_frame(f[cols])
        if ix.has_duplicates:
            raise LangpruneError(f"run {name} lists {int(ix.duplicated().sum())} documents twice")
        idx.append(ix)
    in_b, in_a = idx[0].isin(idx[1]), idx[1].isin(idx[0])
    only_a, only_b, common = int((~in_b).sum()), int((~in_a).sum()), int(in_b.sum())
    if mode == "refuse" and (only_a or only_b):
        raise LangpruneError(
            f"runs were evaluated on different documents: {only_a} only in a, {only_b} only "
            f"in b, {common} shared; pass mode='common' to compare the shared ones"
        )
    if common == 0:
        raise LangpruneError("runs share no document: nothing to compare")
    a = frame_a[in_b].sort_values(cols, kind="stable").reset_index(drop=True)
    b = frame_b[in_a].sort_values(cols, kind="stable").reset_index(drop=True)
    return Alignment(a, b, common, only_a, only_b)


# --- internals -------------------------------------------------------------------------


def _newcombe_phi(both: int, a_only: int, b_only: int, neither: int) -> float:
    """Newcombe's (1998) correlation estimate, ad - bc shrunk by n/2 when positive."""
    n = both + a_only + b_only + neither
    prod = (both + a_only) * (b_only + neither) * (both + b_only) * (a_only + neither)
    if prod == 0:
        return 0.0
    ad_bc = both * neither - a_only * b_only
    num = ad_bc - n / 2 if ad_bc > n / 2 else (0.0 if ad_bc >= 0 else ad_bc)
    return num / math.sqrt(prod)


def _comparison(ival: Interval, null: float, higher_is_better: bool, method: str) -> Comparison:
    verdict = classify(ival.low, ival.high, higher_is_better=higher_is_better, null=null)
    return Comparison(
        ival.value, ival.low, ival.high, null, higher_is_better, verdict, method, ival.n, 1,
        ival.confidence,
    )
