"""Intervals and verdicts for every score a report, verdict or summary compares.

The rule (SCIENCE.md, "Uncertainty and comparisons"): a score carries an interval; two runs are
compared on the same documents or windows; a difference the data cannot resolve is
"indistinguishable"; a task on which the model is at chance is "uninformative". This module
holds the single-run intervals (Wilson intervals for accuracies, percentile bootstraps over
windows for perplexity and bits per byte), the verdict of a difference or ratio, the
informativeness check, the headline and the interval format; the paired comparisons of two
runs (Newcombe, paired and two-level bootstraps, document alignment) are in
:mod:`analysis.paired`. Methods and defaults are explained in docs/statistics.md. Pure
numpy/scipy; every random draw comes from an explicitly seeded Generator.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
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


# --- internals (the validation and bootstrap helpers are shared with analysis.paired) ------


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
