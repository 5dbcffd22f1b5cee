"""The per-run sections of the config: model, calibration, pruning, evaluation and run.

Together they define what one pruned (or dense) run computes (``RUN_SECTIONS``). Each is a
frozen dataclass whose fields carry their tags (:mod:`pipeline.config.tags`) and whose
``__post_init__`` validates it, before any model or data is loaded.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any

from pipeline.config.tags import DENSE, EXEC, STUDY, STUDY_TASKS, TRIAL, _f
from pipeline.config.values import (
    DEFAULT_MODEL,
    DEVICES,
    DTYPES,
    EVAL_PARTS,
    LAYER_SPARSITIES,
    REQUIRED_LANGS,
    _check_langs,
    _check_method,
    format_blend,
    parse_blend,
    parse_nm,
    split_list,
)
from pipeline.errors import LangpruneError
from pipeline.registry import suggest


@dataclass(frozen=True)
class ModelCfg:
    model: str = _f(DEFAULT_MODEL, DENSE, STUDY, TRIAL)  # embedded alias | hub id | folder | .gguf
    device: str = _f("auto", DENSE)  # auto = cuda when available, else cpu
    dtype: str = _f("float32", DENSE, STUDY)  # weights/activations; statistics are always float32
    offload: bool = _f(False, DENSE)  # keep the model on CPU, move one decoder layer at a time
    trust_remote_code: bool = _f(False, DENSE)  # never on unless the user asks
    model_cache: str = _f("", EXEC)  # "" = $LANGPRUNE_CACHE or ~/.cache/langprune (not the repo)

    def __post_init__(self) -> None:
        if not self.model:
            raise LangpruneError("model is empty")
        if self.device not in DEVICES and not re.match(r"^cuda:\d+$", self.device):
            raise LangpruneError(f"unknown device {self.device!r}; known: {', '.join(DEVICES)}")
        if self.dtype not in DTYPES:
            raise LangpruneError(
                f"unknown dtype {self.dtype!r}; known: {', '.join(DTYPES)}"
                f"{suggest(self.dtype, list(DTYPES))}"
            )


@dataclass(frozen=True)
class CalibCfg:
    calib_lang: str = _f("en")  # the blend {calib_lang: 1.0} unless calib_blend is set
    calib_blend: str = _f("")  # "de:0.5,en:0.5"; overrides calib_lang
    normalize_blend: bool = _f(False)  # rescale weights that do not sum to 1 (else: error)
    calib_set: int = _f(0, STUDY, TRIAL)  # which of the disjoint calibration sets of each language
    calib_source: str = _f("ntrex", STUDY, TRIAL)  # ntrex | wmt | tico19 | tydiqa | mc4 (hub)
    n_samples: int = _f(32, STUDY, TRIAL)  # windows; paper: 128 (embedded default budget, README)
    seq_len: int = _f(256, STUDY, TRIAL)  # tokens per window; paper: 2048; never from the model

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise LangpruneError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.seq_len < 2:
            raise LangpruneError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.calib_set < 0:
            raise LangpruneError(f"calib_set must be >= 0, got {self.calib_set}")
        _ = self.blend  # validates weights and languages

    @property
    def blend(self) -> dict[str, float]:
        """The calibration blend, validated; sorted by language code."""
        raw = parse_blend(self.calib_blend) if self.calib_blend else {self.calib_lang: 1.0}
        _check_langs(list(raw), "calibration blend")
        for lang, w in raw.items():
            if not math.isfinite(w) or w < 0:
                raise LangpruneError(f"blend weight for {lang!r} must be finite and >= 0, got {w}")
        total = sum(raw.values())
        if total <= 0:
            raise LangpruneError(f"blend weights are all zero: {self.calib_blend!r}")
        if abs(total - 1.0) > 1e-6:
            if not self.normalize_blend:
                raise LangpruneError(
                    f"blend weights sum to {total:g}, not 1; fix them or set normalize_blend=true"
                )
            raw = {k: v / total for k, v in raw.items()}
        return {k: raw[k] for k in sorted(raw) if raw[k] > 0}

    @property
    def blend_label(self) -> str:
        """Short readable label: 'zh' for a single language, else the canonical blend."""
        b = self.blend
        return next(iter(b)) if len(b) == 1 else format_blend(b)

    @property
    def row_label(self) -> str:
        """A report row's label: ``zh``; ``de+en`` for equal weights; ``de0.3+en0.7``."""
        b = self.blend
        if len(b) == 1:
            return next(iter(b))
        if max(b.values()) - min(b.values()) < 1e-9:
            return "+".join(b)
        return "+".join(f"{k}{w:.2g}" for k, w in b.items())


@dataclass(frozen=True)
class PruneCfg:
    method: str = _f("wanda", STUDY, TRIAL)  # key in pipeline.pruners.PRUNERS
    sparsity: float = _f(0.5, STUDY, TRIAL)  # fraction of weights pruned per matrix (unstructured)
    pattern: str = _f("unstructured", STUDY, TRIAL)  # or N:M, e.g. 2:4
    true_sequential: bool = _f(False, STUDY)  # re-run between attention and MLP groups
    layer_sparsity: str = _f("uniform", STUDY)  # uniform | owl (OWL outlier-weighted, per layer)
    owl_m: float = _f(5.0, STUDY)  # OWL outlier threshold M (multiples of the layer mean score)
    owl_lambda: float = _f(0.08, STUDY)  # OWL spread: ratios scaled to [0, 2*lambda]
    # Method options: fields named <method>_<option> go to that method's pruner, nowhere else
    # (method_options; pipeline.pruners.pruner_from_config).
    sparsegpt_blocksize: int = _f(128, STUDY)  # columns per OBS block (SparseGPT paper)
    sparsegpt_percdamp: float = _f(0.01, STUDY)  # damping as a fraction of mean(diag H)
    sparsegpt_factor: str = _f("auto")  # chol(H^-1): auto | products | lapack (paper's sequence)
    ria_alpha: float = _f(0.5, STUDY)  # RIA exponent a of ||X_j||_2 (paper default); 0 = RI alone
    capture_batch_size: int = _f(8)  # calibration windows per forward pass

    def __post_init__(self) -> None:
        from pipeline.pruners.base import check_target

        _check_method(self.method)
        n, m = parse_nm(self.pattern)
        check_target(self.sparsity, n, m)
        self._check_method_options()
        if self.capture_batch_size < 1:
            raise LangpruneError("capture_batch_size must be >= 1")
        self._check_layer_sparsity(n, m)

    def _check_layer_sparsity(self, n: int, m: int) -> None:
        if self.layer_sparsity not in LAYER_SPARSITIES:
            raise LangpruneError(
                f"unknown layer_sparsity {self.layer_sparsity!r}; known: "
                f"{', '.join(LAYER_SPARSITIES)}"
                f"{suggest(self.layer_sparsity, list(LAYER_SPARSITIES))}"
            )
        if self.layer_sparsity == "owl":
            from pipeline.pruners.owl import check_owl

            if m:
                raise LangpruneError(
                    f"layer_sparsity=owl varies the sparsity per layer, which an N:M pattern "
                    f"({self.pattern}) fixes; use pattern=unstructured or layer_sparsity=uniform"
                )
            check_owl(self.sparsity, self.owl_m, self.owl_lambda)

    def _check_method_options(self) -> None:
        """Every method's options, by the method itself (each reads only its own)."""
        from pipeline.pruners import PRUNERS

        options = self.method_options()
        for name in PRUNERS.names():
            PRUNERS.get(name).from_options(options)

    def method_options(self) -> dict[str, Any]:
        """Every ``<method>_<option>`` field, by its full name (what ``from_options`` reads)."""
        from pipeline.pruners import PRUNERS

        prefixes = tuple(f"{name}_" for name in PRUNERS.names())
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name.startswith(prefixes)}


@dataclass(frozen=True)
class EvalCfg:
    eval_langs: str = _f(",".join(REQUIRED_LANGS), DENSE)  # comma-separated language codes
    eval_source: str = _f("flores", DENSE, STUDY)  # flores (bundled devtest) | flores_hub
    eval_tokens: int = _f(2048, DENSE, STUDY)  # perplexity tokens per language; 0 = all text
    eval_part: str = _f("all", DENSE)  # all | selection (1st half of sentences) | verdict (2nd)
    eval_seq_len: int = _f(512, DENSE, STUDY)  # perplexity window (non-overlapping)
    eval_batch_size: int = _f(4, DENSE)
    # Default: the suite the embedded model is above chance on in every language (README
    # "Task defaults"); xnli and belebele are bundled too. Any lm-eval task name works.
    tasks: str = _f("sib200", DENSE)  # bundled suites (sib200, xnli, belebele) or lm-eval names
    limit: int = _f(50, DENSE, STUDY_TASKS)  # documents per task and language; 0 = all
    num_fewshot: int = _f(0, DENSE, STUDY_TASKS)

    def __post_init__(self) -> None:
        _check_langs(self.eval_lang_list, "eval_langs")
        for name, v in (("eval_tokens", self.eval_tokens), ("limit", self.limit)):
            if v < 0:
                raise LangpruneError(f"{name} must be >= 0, got {v}")
        if self.eval_seq_len < 2:
            raise LangpruneError(f"eval_seq_len must be >= 2, got {self.eval_seq_len}")
        if self.eval_part not in EVAL_PARTS:
            raise LangpruneError(f"unknown eval_part {self.eval_part!r}; known: "
                                 f"{', '.join(EVAL_PARTS)}"
                                 f"{suggest(self.eval_part, list(EVAL_PARTS))}")
        if self.eval_batch_size < 1:
            raise LangpruneError("eval_batch_size must be >= 1")

    @property
    def eval_lang_list(self) -> list[str]:
        return split_list(self.eval_langs)

    @property
    def task_list(self) -> list[str]:
        return split_list(self.tasks)


@dataclass(frozen=True)
class RunCfg:
    seed: int = _f(0, DENSE, STUDY, TRIAL)  # every RNG in a run derives from this
    experiment: str = _f("langprune", EXEC)  # MLflow experiment name
    run_name: str = _f("", EXEC)  # "" = readable default, e.g. wanda-0.5-zh-set0
    force: bool = _f(False, EXEC)  # re-run even when a finished run has the same config
    output_dir: str = _f("outputs", EXEC)  # local scratch for artifacts before they are logged
