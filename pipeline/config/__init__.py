"""The one config definition shared by the CLI, the MLproject and Optuna.

Every field has a globally unique name, so ``calib_lang=zh`` on the command line, the
MLproject parameter ``calib_lang`` and the MLflow param ``calib_lang`` are the same key.
Fields are grouped in frozen per-stage dataclasses; :class:`Config` holds one of each.
Validation runs in ``__post_init__``, before any model or data is loaded, and raises
:class:`~pipeline.errors.LangpruneError` with one clear line.

Defaults are the *embedded default* budgets (Gemma 3 270M on a 2-core laptop, the main job
in under 10 minutes). For the paper's setting (Llama-3-8B, mC4) use ``n_samples=128
seq_len=2048``; see README "Choices".

The package is imported as ``pipeline.config``; its parts are:

- :mod:`~pipeline.config.values`: constants, value parsers and validators, ``canonical``;
- :mod:`~pipeline.config.tags`: the field tags and ``_f``, the tagged field;
- :mod:`~pipeline.config.sections`: ``ModelCfg``, ``CalibCfg``, ``PruneCfg``, ``EvalCfg``,
  ``RunCfg`` (what one run computes);
- :mod:`~pipeline.config.study`: ``SweepCfg``, ``AnalysisCfg``, ``SearchCfg``;
- :mod:`~pipeline.config.core`: ``Config``, ``SECTIONS`` and the key lists derived from tags.
"""

from __future__ import annotations

from typing import Any

from pipeline.config.core import (
    COMMAND_DEFAULTS,
    NON_IDENTITY,
    RUN_SECTIONS,
    SECTIONS,
    Config,
    tagged,
)
from pipeline.config.sections import CalibCfg, EvalCfg, ModelCfg, PruneCfg, RunCfg
from pipeline.config.study import (
    OBJECTIVES_LOWER,
    SEARCH_MODES,
    AnalysisCfg,
    SearchCfg,
    SweepCfg,
)
from pipeline.config.tags import DENSE, EXEC, STUDY, STUDY_TASKS, TRIAL
from pipeline.config.values import (
    DEFAULT_MODEL,
    DEVICES,
    DTYPES,
    EVAL_PARTS,
    LAYER_SPARSITIES,
    REQUIRED_LANGS,
    canonical,
    format_blend,
    parse_blend,
    parse_nm,
    split_list,
    text_part,
)

__all__ = [
    "COMMAND_DEFAULTS",
    "DEFAULT_MODEL",
    "DENSE",
    "DEVICES",
    "DTYPES",
    "EVAL_PARTS",
    "EXEC",
    "LAYER_SPARSITIES",
    "NON_IDENTITY",
    "OBJECTIVES_LOWER",
    "REQUIRED_LANGS",
    "RUN_SECTIONS",
    "SEARCH_MODES",
    "SECTIONS",
    "STUDY",
    "STUDY_TASKS",
    "TRIAL",
    "AnalysisCfg",
    "CalibCfg",
    "Config",
    "EvalCfg",
    "ModelCfg",
    "PruneCfg",
    "RunCfg",
    "SearchCfg",
    "SweepCfg",
    "canonical",
    "format_blend",
    "parse_blend",
    "parse_nm",
    "split_list",
    "tagged",
    "text_part",
]


def __getattr__(name: str) -> Any:
    # METHODS is derived from the pruner registry (lazily: the registry imports torch).
    if name == "METHODS":
        from pipeline.pruners import PRUNERS

        return tuple(PRUNERS.names())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
