"""The language registry: reads ``languages.yaml`` and answers "what exists for language X".

Languages are data, not code (STYLE P4): each entry of ``languages.yaml`` names the language,
its script and FLORES-200 code, which bundled text sources exist for it per role
(calibration / evaluation text / tasks), its hub config names and the lm-eval task names
that exist for it. Adding a language means adding a YAML entry and its data files.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from pipeline.errors import LangpruneError

REQUIRED = ("ar", "de", "en", "es", "ru", "sw", "zh")
# Roles and the names allowed in each; kept in sync with pipeline.data.sources by a test.
CALIBRATION_SOURCES = ("ntrex", "wmt", "tico19", "tydiqa")
EVAL_SOURCES = ("flores",)
TASKS = ("sib200", "xnli", "belebele")
HUB_DATASETS = ("mc4", "flores_plus", "belebele")
BUNDLED_TASK_PREFIX = "langprune"

_YAML = Path(__file__).with_name("languages.yaml")
_ROLES = {"calibration": CALIBRATION_SOURCES, "eval": EVAL_SOURCES, "tasks": TASKS}


@dataclass(frozen=True)
class Language:
    """One registry entry.

    Attributes:
        code: ISO 639-1 code, the key used everywhere (config, file names, params).
        name: English name.
        script: ISO 15924 script code.
        flores_code: FLORES-200 code such as ``arb_Arab`` (also the Belebele config).
        aliases: other spellings that only produce a "did you mean" hint.
        sources: role (``calibration``, ``eval``, ``tasks``) -> bundled names.
        hub: hub dataset (``mc4``, ``flores_plus``, ``belebele``) -> its config name.
        lm_eval_tasks: upstream lm-eval task names for this language.
    """

    code: str
    name: str
    script: str
    flores_code: str
    aliases: tuple[str, ...]
    sources: Mapping[str, tuple[str, ...]] = field(hash=False)
    hub: Mapping[str, str] = field(hash=False)
    lm_eval_tasks: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        """Whether the study needs this language (the paper's seven)."""
        return self.code in REQUIRED

    @property
    def calibration_sources(self) -> tuple[str, ...]:
        return self.sources["calibration"]

    @property
    def eval_sources(self) -> tuple[str, ...]:
        return self.sources["eval"]

    @property
    def tasks(self) -> tuple[str, ...]:
        """Bundled task families with data for this language (``sib200``, ``xnli``, ...)."""
        return self.sources["tasks"]

    @property
    def bundled_tasks(self) -> tuple[str, ...]:
        """Our lm-eval task names for the bundled data, e.g. ``langprune_xnli_de``."""
        return tuple(f"{BUNDLED_TASK_PREFIX}_{t}_{self.code}" for t in self.tasks)

    def task_name(self, task: str) -> str:
        """The bundled lm-eval task name of ``task`` for this language.

        Raises:
            LangpruneError: if the bundled data of ``task`` lacks this language.
        """
        if task not in self.tasks:
            have = [lang.code for lang in all_languages() if task in lang.tasks]
            raise LangpruneError(
                f"bundled task {task!r} has no {self.name} ({self.code}) data;"
                f" languages with {task}: {', '.join(have) or 'none'}"
            )
        return f"{BUNDLED_TASK_PREFIX}_{task}_{self.code}"


def get_language(code: str) -> Language:
    """Return the registry entry for ``code``.

    Raises:
        LangpruneError: for an unknown code, suggesting the nearest known codes; names and
            aliases count too, so ``german`` suggests ``de``.
    """
    registry = _registry()
    if code in registry:
        return registry[code]
    raise LangpruneError(f"unknown language {code!r}{_suggest_codes(code)}")


def all_languages() -> list[Language]:
    """Every registered language, sorted by code."""
    return [lang for _, lang in sorted(_registry().items())]


def language_codes() -> list[str]:
    """Every registered code, sorted."""
    return sorted(_registry())


def _suggest_codes(query: str) -> str:
    """A ``; did you mean ...`` clause: exact name/alias matches first, then close spellings."""
    registry = _registry()
    q = str(query).strip().lower()
    labels: dict[str, str] = {}  # lowercase label -> code
    for lang in registry.values():
        for label in (lang.code, lang.name, lang.flores_code, *lang.aliases):
            labels.setdefault(label.lower(), lang.code)
    picked: list[str] = []
    if q in labels:  # an exact name or alias ("german", "DE") is the only sensible hint
        picked.append(labels[q])
    else:
        for label in difflib.get_close_matches(q, list(labels), n=6, cutoff=0.6):
            if labels[label] not in picked:
                picked.append(labels[label])
    known = ", ".join(sorted(registry))
    if not picked:
        return f"; known: {known}"
    hints = ", ".join(f"{c} ({registry[c].name})" for c in picked[:3])
    return f"; did you mean {hints}? known: {known}"


@functools.lru_cache(maxsize=1)
def _registry() -> Mapping[str, Language]:
    """Parse and validate ``languages.yaml`` once per process (read-only afterwards)."""
    try:
        data = yaml.safe_load(_YAML.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise LangpruneError(f"cannot read language registry {_YAML}: {e}") from None
    entries = data.get("languages") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise LangpruneError(f"{_YAML}: expected a 'languages' mapping")
    langs = {code: _parse_entry(str(code), entry) for code, entry in entries.items()}
    missing = [c for c in REQUIRED if c not in langs]
    if missing:
        raise LangpruneError(f"{_YAML}: required languages missing: {', '.join(missing)}")
    return MappingProxyType(langs)


def _parse_entry(code: str, entry: Any) -> Language:
    where = f"{_YAML.name}: language {code!r}"
    if not isinstance(entry, dict):
        raise LangpruneError(f"{where}: entry must be a mapping")
    for key in ("name", "script", "flores", "sources", "hub", "lm_eval"):
        if key not in entry:
            raise LangpruneError(f"{where}: missing key {key!r}")
    sources = entry["sources"] or {}
    parsed: dict[str, tuple[str, ...]] = {}
    for role, allowed in _ROLES.items():
        names = tuple(sources.get(role) or ())
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise LangpruneError(
                f"{where}: unknown {role} source(s) {unknown}; allowed: {', '.join(allowed)}"
            )
        parsed[role] = names
    hub = {str(k): str(v) for k, v in (entry["hub"] or {}).items()}
    unknown_hub = [k for k in hub if k not in HUB_DATASETS]
    if unknown_hub:
        raise LangpruneError(f"{where}: unknown hub dataset(s) {unknown_hub}")
    return Language(
        code=code,
        name=str(entry["name"]),
        script=str(entry["script"]),
        flores_code=str(entry["flores"]),
        aliases=tuple(str(a) for a in entry.get("aliases") or ()),
        sources=MappingProxyType(parsed),
        hub=MappingProxyType(hub),
        lm_eval_tasks=tuple(str(t) for t in entry["lm_eval"] or ()),
    )
