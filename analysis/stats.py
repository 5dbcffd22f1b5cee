"""Uncertainty and paired comparisons for every score a report, verdict or summary compares.

The rule (SCIENCE.md, "Uncertainty and comparisons"): a score carries an interval; two runs are
compared on the same documents or windows; a difference the data cannot resolve is
"indistinguishable"; a task on which the model is at chance is "uninformative". Methods and
defaults are explained in docs/statistics.md: Wilson intervals for accuracies, percentile
bootstraps over windows for perplexity and bits per byte, Newcombe's paired interval with exact
McNemar for paired accuracies, a paired bootstrap for perplexity ratios, and a two-level
bootstrap over calibration sets x documents. Pure numpy/scipy/pandas; every random draw comes
from an explicitly seeded Generator.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray
from scipy import stats as sps

from pipeline.errors import LangpruneError

Verdict = Literal["better", "worse", "indistinguishable"]
VERDICTS: tuple[str, ...] = ("better", "worse", "indistinguishable")
UNINFORMATIVE = "uninformative"  # a case excluded from verdict counts (model at chance)

Z95 = 1.959964  # two-sided 95% normal quantile
DEFAULT_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 2000  # percentile bootstrap: enough for stable 2.5/97.5% quantiles
DEFAULT_SEED = 0
# Bootstrap weights are drawn in chunks of at most this many cells (resamples x units), so
# memory stays ~32 MB whatever the number of windows or documents.
_CHUNK_CELLS = 1 << 22

Seed = int | np.random.Generator


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval."""

    value: float
    low: float
    high: float
    confidence: float  # e.g. 0.95
    method: str  # "wilson", "bootstrap-windows"
    n: int  # independent units (documents or windows) behind it


@dataclass(frozen=True)
class Comparison:
    """A paired comparison of run a against run b; the verdict is said of a."""

    estimate: float  # a - b for differences, a / b for ratios
    low: float
    high: float
    null: float  # the no-difference value: 0 for differences, 1 for ratios
    higher_is_better: bool  # direction of the underlying score
    verdict: Verdict
    method: str  # "newcombe-paired", "bootstrap-paired", "bootstrap-sets-docs", ...
    n: int  # paired units (documents or windows)
    n_sets: int = 1  # calibration sets paired over (1 unless two-level)
    confidence: float = DEFAULT_CONFIDENCE


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


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for an accuracy k / n (Wilson 1927).

    Args:
        k: Number of correct documents, 0 <= k <= n.
        n: Number of documents; must be positive.
        z: Two-sided normal quantile (1.959964 for 95%).

    Returns:
        (low, high), clipped to [0, 1].

    Raises:
        LangpruneError: If n <= 0 (an accuracy over no documents has no interval) or k is
            outside [0, n].
    """
    if n <= 0:
        raise LangpruneError(f"accuracy over n={n} documents has no interval")
    if not 0 <= k <= n:
        raise LangpruneError(f"accuracy needs 0 <= k <= n, got k={k}, n={n}")
    p, z2 = k / n, z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # The bounds are exactly 0 at k = 0 and 1 at k = n; rounding would miss them by 1e-16.
    low = 0.0 if k == 0 else max(0.0, center - half)
    return low, 1.0 if k == n else min(1.0, center + half)


def accuracy_interval(correct: ArrayLike, z: float = Z95) -> Interval:
    """Accuracy of per-document 0/1 outcomes with its Wilson interval.

    Args:
        correct: One boolean (or 0/1) outcome per document.
        z: Two-sided normal quantile.
    """
    c = _as_binary(correct, "correct")
    low, high = wilson_interval(int(c.sum()), c.size, z)
    conf = 2 * float(sps.norm.cdf(z)) - 1
    return Interval(float(c.mean()), low, high, conf, "wilson", c.size)


def is_informative(k: int, n: int, chance: float, z: float = Z95) -> bool:
    """Whether an accuracy k / n tells anything: its Wilson interval lies above chance.

    An interval that contains the chance level (1 / number of choices), or lies below it,
    makes the task uninformative for this model (SCIENCE.md): no claim is drawn from it.

    Args:
        k, n: Correct documents and documents.
        chance: Accuracy of guessing, e.g. 0.25 for four choices.
        z: Two-sided normal quantile.

    Returns:
        True only if the lower Wilson bound exceeds ``chance``.
    """
    return wilson_interval(k, n, z)[0] > chance


def classify(low: float, high: float, *, higher_is_better: bool, null: float = 0.0) -> Verdict:
    """Verdict for run a from the interval of its difference (a - b) or ratio (a / b) to b.

    An interval that contains or touches ``null`` (0 for a difference, 1 for a ratio) is
    "indistinguishable"; otherwise a is "better" if it lies on the good side of ``null``.

    Args:
        low, high: Bounds of the difference or ratio.
        higher_is_better: True for accuracy-like scores, False for perplexity-like ones.
        null: The no-difference value.

    Returns:
        "better", "worse" or "indistinguishable".

    Raises:
        LangpruneError: If a bound is NaN or low > high.
    """
    if math.isnan(low) or math.isnan(high) or low > high:
        raise LangpruneError(f"not an interval: [{low}, {high}]")
    if low <= null <= high:
        return "indistinguishable"
    a_higher = low > null
    return "better" if a_higher == higher_is_better else "worse"


def perplexity_interval(
    nll_sum: ArrayLike,
    n_tokens: ArrayLike,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: Seed = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Interval:
    """Perplexity exp(sum nll / sum tokens) with a percentile bootstrap over windows.

    Args:
        nll_sum: Summed next-token NLL (nats) of each evaluation window.
        n_tokens: Predicted tokens of each window.
        resamples, seed, confidence: Bootstrap resamples, seed or Generator, level.

    Returns:
        The perplexity as an :class:`Interval` (method "bootstrap-windows").
    """
    return _pooled_interval(nll_sum, n_tokens, np.exp, resamples, seed, confidence)


def bits_per_byte_interval(
    nll_sum: ArrayLike,
    n_bytes: ArrayLike,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: Seed = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Interval:
    """Bits per byte sum nll / (ln 2 * sum bytes) with a percentile bootstrap over windows.

    Args:
        nll_sum: Summed NLL (nats) of each window (or sentence).
        n_bytes: UTF-8 bytes of the text each window covers.
        resamples, seed, confidence: Bootstrap resamples, seed or Generator, level.

    Returns:
        Bits per byte as an :class:`Interval` (method "bootstrap-windows").
    """
    return _pooled_interval(nll_sum, n_bytes, _nats_to_bits, resamples, seed, confidence)


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


def headline(verdicts: Sequence[str], subject: str = "target-language calibration") -> str:
    """One sentence counting verdicts, e.g. for a report's summary line.

    "uninformative" cases are excluded from the total and named after it.

    Args:
        verdicts: One of "better", "worse", "indistinguishable", "uninformative" per case.
        subject: What the verdicts are about (said of run a).

    Returns:
        e.g. "target-language calibration is better in 3, worse in 1, indistinguishable in
        10 of 14 cases; 4 uninformative cases not counted".
    """
    counts = Counter(verdicts)
    unknown = set(counts) - {*VERDICTS, UNINFORMATIVE}
    if unknown:
        raise LangpruneError(f"unknown verdicts {sorted(unknown)}; expected {VERDICTS}")
    total = sum(counts[v] for v in VERDICTS)
    parts = ", ".join(f"{v} in {counts[v]}" for v in VERDICTS)
    text = f"{subject} is {parts} of {total} case" + ("" if total == 1 else "s")
    n = counts[UNINFORMATIVE]
    if n:
        text += f"; {n} uninformative case{'' if n == 1 else 's'} not counted"
    return text


def fmt_interval(value: float, low: float, high: float, digits: int = 2) -> str:
    """Render an estimate and its interval as "0.53 [0.48, 0.58]".

    Always the bracketed bounds, never "±": Wilson and bootstrap intervals are asymmetric,
    and a half-width would misstate one side.

    Args:
        value, low, high: Point estimate and bounds.
        digits: Decimals for all three numbers.
    """
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


# --- internals -------------------------------------------------------------------------


def _nats_to_bits(x: np.ndarray) -> np.ndarray:
    return x / math.log(2)


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise LangpruneError(f"confidence must be in (0, 1), got {confidence}")
    return float(sps.norm.ppf(0.5 + confidence / 2))


def _as_binary(x: ArrayLike, name: str) -> NDArray[np.bool_]:
    arr = np.asarray(x)
    if arr.ndim != 1 or arr.size == 0:
        raise LangpruneError(f"{name} must be a non-empty 1-D array of outcomes")
    if not np.isin(arr, (0, 1)).all():
        raise LangpruneError(f"{name} must hold only 0/1 or booleans")
    return arr.astype(bool)


def _as_float(x: ArrayLike, name: str) -> NDArray[np.float64]:
    arr = np.asarray(x, dtype=float)
    if arr.ndim != 1 or arr.size == 0 or not np.isfinite(arr).all():
        raise LangpruneError(f"{name} must be a non-empty 1-D array of finite numbers")
    return arr


def _same_length(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.size != b.size:
        raise LangpruneError(f"paired inputs cover different {what}: {a.size} vs {b.size}")


def _newcombe_phi(both: int, a_only: int, b_only: int, neither: int) -> float:
    """Newcombe's (1998) correlation estimate, ad - bc shrunk by n/2 when positive."""
    n = both + a_only + b_only + neither
    prod = (both + a_only) * (b_only + neither) * (both + b_only) * (a_only + neither)
    if prod == 0:
        return 0.0
    ad_bc = both * neither - a_only * b_only
    num = ad_bc - n / 2 if ad_bc > n / 2 else (0.0 if ad_bc >= 0 else ad_bc)
    return num / math.sqrt(prod)


def _weights(rng: np.random.Generator, n: int, resamples: int) -> list[NDArray[np.float64]]:
    """Bootstrap weights: row r counts how often each of n units is drawn in resample r."""
    if resamples < 1:
        raise LangpruneError(f"resamples must be >= 1, got {resamples}")
    chunk = max(1, _CHUNK_CELLS // n)
    p = np.full(n, 1.0 / n)
    sizes = [min(chunk, resamples - i) for i in range(0, resamples, chunk)]
    return [rng.multinomial(n, p, size=s).astype(float) for s in sizes]


def _interval(value: float, boot: np.ndarray, confidence: float, n: int) -> Interval:
    _z(confidence)  # validates the level
    alpha = 1 - confidence
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return Interval(value, float(low), float(high), confidence, "bootstrap-windows", n)


def _comparison(ival: Interval, null: float, higher_is_better: bool, method: str) -> Comparison:
    verdict = classify(ival.low, ival.high, higher_is_better=higher_is_better, null=null)
    return Comparison(
        ival.value, ival.low, ival.high, null, higher_is_better, verdict, method, ival.n, 1,
        ival.confidence,
    )


def _pooled_interval(
    num: ArrayLike,
    den: ArrayLike,
    transform: Callable[[np.ndarray], np.ndarray],
    resamples: int,
    seed: Seed,
    confidence: float,
) -> Interval:
    x, d = _as_float(num, "nll_sum"), _as_float(den, "denominator")
    _same_length(x, d, "windows")
    if d.sum() <= 0:
        raise LangpruneError("no tokens or bytes to normalise by")
    rng = np.random.default_rng(seed)
    weights = _weights(rng, x.size, resamples)
    boot = np.concatenate([transform((w @ x) / (w @ d)) for w in weights])
    return _interval(float(transform(np.asarray(x.sum() / d.sum()))), boot, confidence, x.size)
