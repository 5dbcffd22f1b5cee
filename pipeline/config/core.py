"""The whole config: :class:`Config` (one of each section), its flat keys, overrides and
canonical serialisation, and the key lists derived from the field tags.

A key's section is found through :data:`SECTIONS`; overrides (often strings from argv or
the MLproject) are coerced to the field's type by :func:`_coerce`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.sections import CalibCfg, EvalCfg, ModelCfg, PruneCfg, RunCfg
from pipeline.config.study import AnalysisCfg, SearchCfg, SweepCfg
from pipeline.config.tags import EXEC
from pipeline.config.values import canonical, format_blend
from pipeline.errors import LangpruneError
from pipeline.registry import suggest

# Defaults a command uses instead of the config's when the user does not set the key. The
# sweep evaluates 14+ runs: with these budgets the default grid (7 languages x wanda,sparsegpt),
# its analyses and the report fit in 90 minutes on two CPU cores (benchmarks/RESULTS.md).
COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {
    "sweep": {"eval_tokens": 1024, "limit": 50},  # limit: the main job's, stated for the sweep
}


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
