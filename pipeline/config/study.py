"""The study sections of the config: the sweep grid, its analyses and the blend search.

Their keys describe how runs are *grouped* (params of the sweep/search parent runs), not
what one run computes; a search's trials depend on the fields tagged ``study``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config.sections import CalibCfg
from pipeline.config.tags import STUDY, TRIAL, _f
from pipeline.config.values import (
    REQUIRED_LANGS,
    _check_langs,
    _check_method,
    format_blend,
    parse_blend,
    split_list,
)
from pipeline.errors import LangpruneError

OBJECTIVES_LOWER = ("ppl", "bpb")  # lower is better; any task name is higher-is-better
SEARCH_MODES = ("fast", "exact")


@dataclass(frozen=True)
class SweepCfg:
    sweep_langs: str = ",".join(REQUIRED_LANGS)  # calibration languages of the grid
    sweep_methods: str = "wanda,sparsegpt"
    sweep_sets: int = 1  # calibration sets per language (3 for intra-language IoU)
    sweep_blends: str = ""  # extra rows, ";"-separated: uniform | *+en | de+en | de:0.3,en:0.7
    sweep_sparsities: str = ""  # "" = just sparsity; e.g. 0.2,0.5: every cell at each

    def __post_init__(self) -> None:
        _check_langs(split_list(self.sweep_langs), "sweep_langs")
        for m in split_list(self.sweep_methods):
            _check_method(m, "sweep_methods")
        if not split_list(self.sweep_methods):
            raise LangpruneError("sweep_methods is empty")
        if self.sweep_sets < 1:
            raise LangpruneError(f"sweep_sets must be >= 1, got {self.sweep_sets}")
        for blend in self.blend_rows():
            CalibCfg(calib_blend=blend)  # languages known, weights summing to 1
        _ = self.sparsity_list  # validates

    def blend_rows(self) -> list[str]:
        """The extra calibration rows as canonical blend strings, in the order given.

        ``uniform``: every sweep language with equal weight; ``*+en``: each sweep language
        paired with ``en`` at equal weights (``en`` itself skipped); ``de+en``: equal weights;
        ``de:0.3,en:0.7``: explicit (weights must sum to 1).
        """
        langs = split_list(self.sweep_langs)
        rows: list[str] = []
        for item in (i.strip() for i in self.sweep_blends.split(";")):
            if not item:
                continue
            if item == "uniform":
                groups = [langs]
            elif item.startswith("*+"):
                other = item[2:]
                groups = [[lang, other] for lang in langs if lang != other]
            elif ":" in item:
                rows.append(format_blend(parse_blend(item)))
                continue
            else:
                groups = [split_list(item.replace("+", ","))]
            for group in groups:
                if len(set(group)) != len(group) or len(group) < 2:
                    raise LangpruneError(
                        f"sweep_blends item {item!r}: name two or more different languages")
                rows.append(format_blend({lang: 1.0 / len(group) for lang in group}))
        return list(dict.fromkeys(rows))

    @property
    def sparsity_list(self) -> list[float]:
        """The grid's sparsities (empty: the config's ``sparsity`` alone)."""
        out = []
        for item in split_list(self.sweep_sparsities):
            try:
                value = float(item)
            except ValueError:
                raise LangpruneError(f"sweep_sparsities: {item!r} is not a number") from None
            if not (math.isfinite(value) and 0.0 <= value < 1.0):
                raise LangpruneError(f"sweep_sparsities: {item} is outside [0, 1)")
            out.append(value)
        return out


@dataclass(frozen=True)
class AnalysisCfg:
    sweep_run: str = ""  # the sweep parent run to analyse/report; "" = the newest sweep
    analysis_tokens: int = 2048  # FLORES tokens per language for SNR / LSAR / LAPE (RESULTS.md 7)
    analysis_seq_len: int = 256  # window length for those passes
    lsar_sentences: int = 0  # parallel LSAR prompts per language; 0 = what analysis_tokens reach
    lsar_pooling: str = "last"  # last | mean (docs/science.md#lsar: last-token by default)
    lape_top_rate: float = 0.01  # keep the lowest 1% LAPE
    lape_filter_quantile: float = 0.95  # activation-probability filter
    report_dir: str = "reports"  # where `report` writes its files (also logged to MLflow)

    def __post_init__(self) -> None:
        if self.analysis_tokens < 1 or self.analysis_seq_len < 2:
            raise LangpruneError("analysis_tokens must be >= 1 and analysis_seq_len >= 2")
        if self.lsar_sentences < 0:
            raise LangpruneError("lsar_sentences must be >= 0 (0: from analysis_tokens)")
        if self.lsar_pooling not in ("last", "mean"):
            raise LangpruneError(f"lsar_pooling must be last or mean, got {self.lsar_pooling!r}")
        if not 0 < self.lape_top_rate < 1 or not 0 < self.lape_filter_quantile < 1:
            raise LangpruneError("lape_top_rate and lape_filter_quantile must be in (0, 1)")


@dataclass(frozen=True)
class SearchCfg:
    target_lang: str = _f("sw", STUDY, TRIAL)  # the language whose objective the search optimises
    objective: str = _f("ppl", STUDY, TRIAL)  # ppl | bpb | <task> | mix "ppl:0.5,sib200:0.5"
    languages: str = ",".join(REQUIRED_LANGS)  # candidate pool of calibration languages
    n_trials: int = 20
    study_name: str = ""  # "" = blend-<target>-<method>-<objective>-<mode>
    storage: str = ""  # "" = sqlite:///optuna.db in the working directory; any Optuna RDB URL
    mode: str = _f("fast", STUDY, TRIAL)  # fast = cached language statistics; exact = full prune
    enqueue_single: bool = False  # also enqueue every single-language blend
    verdict_sets: int = 3  # calibration sets for the best-vs-target-only comparison
    search_eval_tokens: int = _f(1024, STUDY, TRIAL)  # target-language perplexity budget per trial

    def __post_init__(self) -> None:
        _check_langs([self.target_lang], "target_lang")
        _check_langs(split_list(self.languages), "languages")
        if self.mode not in SEARCH_MODES:
            raise LangpruneError(f"unknown search mode {self.mode!r}; known: fast, exact")
        if self.n_trials < 1:
            raise LangpruneError(f"n_trials must be >= 1, got {self.n_trials}")
        if self.verdict_sets < 2:
            raise LangpruneError("verdict_sets must be >= 2 (a confidence interval needs two)")
        if self.search_eval_tokens < 0:
            raise LangpruneError("search_eval_tokens must be >= 0")
        if self.storage:
            scheme = self.storage.split(":", 1)[0].split("+", 1)[0]
            if scheme not in ("sqlite", "postgresql", "mysql"):
                raise LangpruneError(
                    f"unknown storage scheme {scheme!r} in {self.storage!r}; use sqlite:///FILE,"
                    " postgresql+psycopg2://... or mysql://..."
                )
        _ = self.objective_terms  # validates

    @property
    def objective_terms(self) -> dict[str, float]:
        """``{'ppl': 1.0}`` or the weighted mix; every term is a metric of the target language."""
        if ":" not in self.objective:
            return {self.objective: 1.0}
        terms = parse_blend(self.objective)
        if any(not math.isfinite(w) for w in terms.values()):
            raise LangpruneError(f"objective weights must be finite: {self.objective!r}")
        return terms
