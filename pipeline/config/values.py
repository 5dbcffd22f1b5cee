"""Config value vocabulary: the constants fields are checked against, and the parsers,
validators and the one serializer that the section dataclasses share.

Nothing here knows a section; the sections (:mod:`pipeline.config.sections`,
:mod:`pipeline.config.study`) and :class:`~pipeline.config.Config` build on it.
"""

from __future__ import annotations

import math
import re
from typing import Any

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


def canonical(value: Any) -> str:
    """The one serializer of config values to strings (MLflow params are strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(float(value)) if math.isfinite(value) else str(value)
    return str(value)
