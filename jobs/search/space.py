"""The search space: raw weights in the unit cube, blends, window counts.

One ``suggest_float("w_<lang>", 0, 1)`` per pool language; the blend is the raw weights
normalised to sum 1 (all zero -> the uniform blend, the limit of equal weights), so every point
of the cube is a valid blend and the raw and normalised weights are both logged. A blend
becomes ``n_samples`` calibration windows by largest-remainder rounding
(:func:`pipeline.data.sampler.largest_remainder`); the objective depends only on these
*counts*, and the *effective blend* ``counts / n_samples`` is what a trial calibrates on
(``calib_blend``). Trial 0 is the target-only blend, enqueued when the study has no trials;
``enqueue_single=true`` also enqueues every single-language blend.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import optuna

from pipeline.config import Config, format_blend, split_list
from pipeline.errors import LangpruneError

log = logging.getLogger(__name__)

PARAM_PREFIX = "w_"  # Optuna param name of a language's raw weight


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


def search_pool(cfg: Config) -> list[str]:
    """The candidate languages, sorted; the target is added when missing (trial 0 needs it)."""
    pool = split_list(cfg.search.languages)
    if len(set(pool)) != len(pool):
        raise LangpruneError(f"languages names a language twice: {cfg.search.languages}")
    if cfg.search.target_lang not in pool:
        log.warning("target_lang %s added to the language pool", cfg.search.target_lang)
        pool.append(cfg.search.target_lang)
    return sorted(pool)
