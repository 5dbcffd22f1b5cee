"""What a trial optimises (one direction table, :data:`pipeline.config.OBJECTIVES_LOWER`).

``ppl`` or ``bpb`` of the target language (minimised); a task score such as ``sib200`` (its
accuracy in the target language) or ``<task>.<metric>`` for any lm-eval task (maximised). A
weighted mix ``"ppl:0.5,sib200:10"`` is minimised as ``sum_t w_t * s_t * metric_t`` with
``s_t = +1`` for lower-is-better and ``-1`` for higher-is-better metrics (the weights set the
scales).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.config import OBJECTIVES_LOWER
from pipeline.errors import LangpruneError


class TrialFailure(Exception):
    """An expected trial failure (NaN objective, missing metric): recorded, never fatal."""


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
