"""The one config definition shared by the CLI, the MLproject and Optuna.

Every field has a globally unique name, so ``calib_lang=zh`` on the command line, the
MLproject parameter ``calib_lang`` and the MLflow param ``calib_lang`` are the same key.
Fields are grouped in frozen per-stage dataclasses; :class:`Config` holds one of each.
Validation runs in ``__post_init__``, before any model or data is loaded, and raises
:class:`~pipeline.errors.LangpruneError` with one clear line.

Defaults are the *embedded default* budgets (Gemma 3 270M on a 2-core laptop, the main job
in under 10 minutes). For the paper's setting (Llama-3-8B, mC4) use ``n_samples=128
seq_len=2048``; see README "Choices".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import LangpruneError
from pipeline.registry import suggest

DEFAULT_MODEL = "gemma-3-270m"
# == pipeline.data.languages.REQUIRED (tested)
REQUIRED_LANGS = ("ar", "de", "en", "es", "ru", "sw", "zh")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
LAYER_SPARSITIES = ("uniform", "owl")
EVAL_PARTS = ("all", "selection", "verdict")


def text_part(sentences: list[str], part: str) -> list[str]:
    """The evaluation sentences of ``part``: ``all``, or the first (``selection``) or second
    (``verdict``) half by sentence index, so a search selects and confirms on disjoint text
    (halves keep FLORES's consecutive sentences of one article together)."""
    half = len(sentences) // 2
    if part == "selection":
        return sentences[:half]
    if part == "verdict":
        return sentences[half:]
    return sentences
# Field tags (declared once, on the fields; every key list below is derived from them):
EXEC = "exec"  # how a run is executed, not what it computes: not in the config hash
DENSE = "dense"  # the dense baseline depends on it (its hash, dense_identity)
STUDY = "study"  # a blend search's trials depend on it (a resumed study must match)
STUDY_TASKS = "study_tasks"  # ... when the objective evaluates tasks
TRIAL = "trial"  # logged as a param of every search trial run


def _f(default: Any, *tags: str) -> Any:
    """A config field with its tags (see :data:`EXEC` etc.)."""
    return field(default=default, metadata={"tags": frozenset(tags)})


def __getattr__(name: str) -> Any:
    # METHODS is derived from the pruner registry (lazily: the registry imports torch).
    if name == "METHODS":
        from pipeline.pruners import PRUNERS

        return tuple(PRUNERS.names())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_method(method: str, what: str = "method") -> None:
    from pipeline.pruners import PRUNERS

    names = PRUNERS.names()
    if method not in names:
        where = "" if what == "method" else f" in {what}"
        raise LangpruneError(
            f"unknown method {method!r}{where}; known: {', '.join(names)}{suggest(method, names)}"
        )
_NM = re.compile(r"^(\d+):(\d+)$")


def parse_nm(pattern: str) -> tuple[int, int]:
    """Parse ``'N:M'`` into ``(n, m)``; ``'unstructured'`` gives ``(0, 0)``."""
    if pattern == "unstructured":
        return 0, 0
    match = _NM.match(pattern)
    if not match:
        raise LangpruneError(
            f"malformed pattern {pattern!r}: use 'unstructured' or 'N:M' such as '2:4'"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if m < 1 or n < 1 or n >= m:
        raise LangpruneError(f"pattern {pattern!r}: N:M needs 0 < N < M (N pruned of every M)")
    return n, m


def parse_blend(spec: str) -> dict[str, float]:
    """Parse ``'de:0.5,en:0.5'`` into ``{'de': 0.5, 'en': 0.5}`` (order kept, no checks)."""
    blend: dict[str, float] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        lang, sep, weight = part.partition(":")
        if not sep:
            raise LangpruneError(f"malformed blend item {part!r}: use lang:weight, e.g. de:0.5")
        lang = lang.strip()
        if lang in blend:
            raise LangpruneError(f"blend names {lang!r} twice")
        try:
            blend[lang] = float(weight)
        except ValueError:
            raise LangpruneError(f"blend weight for {lang!r} is not a number: {weight!r}") from None
    if not blend:
        raise LangpruneError(f"empty blend {spec!r}")
    return blend


def format_blend(blend: dict[str, float]) -> str:
    """Canonical blend string: languages sorted, weights in canonical float form."""
    return ",".join(f"{k}:{canonical(v)}" for k, v in sorted(blend.items()))


def split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _check_langs(codes: list[str], what: str) -> None:
    from pipeline.data.languages import get_language  # lazy: keeps config import light

    for code in codes:
        get_language(code)  # raises LangpruneError with suggestions
    if not codes:
        raise LangpruneError(f"{what} is empty")


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


# Defaults a command uses instead of the config's when the user does not set the key. The
# sweep evaluates 14+ runs: with these budgets the default grid (7 languages x wanda,sparsegpt),
# its analyses and the report fit in 90 minutes on two CPU cores (benchmarks/RESULTS.md).
COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {
    "sweep": {"eval_tokens": 1024, "limit": 50},  # limit: the main job's, stated for the sweep
}

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


SECTIONS: dict[str, type] = {
    "model": ModelCfg,
    "calib": CalibCfg,
    "prune": PruneCfg,
    "eval": EvalCfg,
    "sweep": SweepCfg,
    "search": SearchCfg,
    "analysis": AnalysisCfg,
    "run": RunCfg,
}

# Sections that define what one pruned (or dense) run computes. Sweep and search keys only
# describe how runs are *grouped*; they are params of the sweep/search parent runs.
RUN_SECTIONS = ("model", "calib", "prune", "eval", "run")


def tagged(tag: str) -> tuple[str, ...]:
    """Every config key whose field carries ``tag``, in declaration order."""
    return tuple(f.name for typ in SECTIONS.values() for f in fields(typ)
                 if tag in f.metadata.get("tags", ()))


# Fields that describe *how* a run is executed, not *what* it computes: excluded from the
# config hash (device is not among them: a cuda run reuses a cpu run only if asked to).
NON_IDENTITY = frozenset(tagged(EXEC))


@dataclass(frozen=True)
class Config:
    model: ModelCfg = field(default_factory=ModelCfg)
    calib: CalibCfg = field(default_factory=CalibCfg)
    prune: PruneCfg = field(default_factory=PruneCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    sweep: SweepCfg = field(default_factory=SweepCfg)
    search: SearchCfg = field(default_factory=SearchCfg)
    analysis: AnalysisCfg = field(default_factory=AnalysisCfg)
    run: RunCfg = field(default_factory=RunCfg)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def keys(cls) -> dict[str, tuple[str, dataclasses.Field]]:
        """Every flat key -> (section name, dataclass field)."""
        out: dict[str, tuple[str, dataclasses.Field]] = {}
        for sec, typ in SECTIONS.items():
            for f in fields(typ):
                assert f.name not in out, f"duplicate config key {f.name}"
                out[f.name] = (sec, f)
        return out

    @classmethod
    def from_overrides(cls, overrides: dict[str, Any] | None = None, base: Config | None = None):
        """Build a config from flat ``key -> value`` overrides (strings are parsed)."""
        keys = cls.keys()
        per_sec: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        for key, value in (overrides or {}).items():
            if key not in keys:
                raise LangpruneError(f"unknown config key {key!r}{suggest(key, list(keys))}")
            sec, f = keys[key]
            per_sec[sec][key] = _coerce(key, value, f)
        built = {
            sec: typ(**per_sec[sec])
            if base is None
            else dataclasses.replace(getattr(base, sec), **per_sec[sec])
            for sec, typ in SECTIONS.items()
        }
        return cls(**built)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None,
                  defaults: dict[str, Any] | None = None) -> Config:
        """Load a flat YAML mapping of keys (same names as overrides) over ``defaults``, then
        apply overrides."""
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as e:
            raise LangpruneError(f"cannot read config {path}: {e.strerror}") from None
        if not isinstance(data, dict):
            raise LangpruneError(f"config {path} must be a mapping of key: value")
        return cls.from_overrides({**(defaults or {}), **data, **(overrides or {})})

    def replace(self, **overrides: Any) -> Config:
        return Config.from_overrides(overrides, base=self)

    # ---- serialisation ------------------------------------------------------------------
    def to_flat(self, sections: tuple[str, ...] = tuple(SECTIONS)) -> dict[str, str]:
        """The canonical flat form: every key -> its canonical string (MLflow params)."""
        flat: dict[str, str] = {}
        for sec in sections:
            for f in fields(SECTIONS[sec]):
                flat[f.name] = canonical(getattr(getattr(self, sec), f.name))
        return dict(sorted(flat.items()))

    def identity(self) -> dict[str, str]:
        """The flat form without execution-only keys; equal identity = same experiment."""
        flat = {k: v for k, v in self.to_flat(RUN_SECTIONS).items() if k not in NON_IDENTITY}
        # calib_blend overrides calib_lang: store the resolved blend so that
        # calib_lang=zh and calib_blend=zh:1 hash the same.
        flat["calib_blend"] = format_blend(self.calib.blend)
        flat["calib_lang"] = self.calib.blend_label
        return flat

    def config_hash(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(
            {k: getattr(getattr(self, s), k) for k, (s, _) in self.keys().items()},
            sort_keys=True,
            allow_unicode=True,
        )


def canonical(value: Any) -> str:
    """The one serializer of config values to strings (MLflow params are strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(float(value)) if math.isfinite(value) else str(value)
    return str(value)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(key: str, value: Any, f: dataclasses.Field) -> Any:
    """Turn an override (often a string from argv/MLproject) into the field's type."""
    typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if typ == "bool":
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise ValueError
        if typ == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(str(value).strip()) if isinstance(value, str) else int(value)
        if typ == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return "" if value is None else str(value)
    except (TypeError, ValueError):
        raise LangpruneError(f"{key}: cannot read {value!r} as {typ}") from None
