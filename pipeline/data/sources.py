"""Text sources behind one interface: ``load_documents(source, lang) -> list[Document]``.

The registry of every text source, the public loading API and the bundled sources, which
read the gzip'd JSONL copies under ``data/`` (see ``data/README.md``). Hub sources call
``datasets.load_dataset`` and exist for users with network access
(:mod:`pipeline.data.hub_sources`). Roles never overlap: calibration text (NTREX-128 by
default; WMT news, TICO-19, TyDi QA passages, mC4) is disjoint from evaluation text
(FLORES-200 devtest), which is what perplexity, LSAR and LAPE read. The interface's
:class:`Document` and :data:`SENTENCE_JOIN` are defined in :mod:`pipeline.data.documents`
and importable from here.

Sample YAML::

    calib_source: ntrex      # ntrex | wmt | tico19 | tydiqa | mc4 (hub)
    eval_source: flores      # flores | flores_hub | belebele_hub (hub)

Hub sources fail fast offline, before ``datasets`` is even imported
(:mod:`pipeline.data.hub_sources`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.documents import (
    CALIBRATION,
    EVAL,
    Document,
    _field,
    _group,
    _texts,
    bundled_path,
    read_jsonl,
)
from pipeline.data.documents import SENTENCE_JOIN as SENTENCE_JOIN  # re-export: the interface
from pipeline.data.hub_sources import (
    _HUB_CONFIG_KEY,
    BELEBELE_ID,
    FLORES_PLUS_ID,
    MC4_ID,
    _belebele_passages,
    _belebele_sentences,
    _flores_hub_documents,
    _flores_hub_sentences,
    _mc4,
)
from pipeline.data.languages import Language, get_language
from pipeline.errors import LangpruneError
from pipeline.registry import Registry, suggest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextSource:
    """A registered text source.

    Attributes:
        name: registry key (``ntrex``, ``flores``, ``mc4``, ...).
        role: ``calibration`` or ``eval``; calibration never reads an eval source.
        hub: whether loading needs the Hugging Face hub.
        description: one line for listings and errors.
        documents: ``Language -> list[Document]`` (the language is already validated).
        sentences: ``Language -> list[str]`` for eval sources, else ``None``.
    """

    name: str
    role: str
    hub: bool
    description: str
    documents: Callable[[Language], list[Document]]
    sentences: Callable[[Language], list[str]] | None = None

    def has_language(self, lang: Language) -> bool:
        """Whether this source has text in ``lang`` (from the language registry)."""
        if self.hub:
            return _HUB_CONFIG_KEY[self.name] in lang.hub
        return self.name in lang.sources.get(self.role, ())


SOURCES: Registry[TextSource] = Registry("text source")


# ---- public API ------------------------------------------------------------------------------
def get_source(name: str, role: str | None = None) -> TextSource:
    """Return the registered source ``name`` (LangpruneError with suggestions if unknown).

    Args:
        name: registry key.
        role: where the name was given (``calibration`` for ``calib_source``): an unknown
            name then lists, and suggests among, the sources of that role only, and a
            source of another role is refused.
    """
    if role is None:
        return SOURCES.get(name)
    names = [n for n in SOURCES.names() if SOURCES.get(n).role == role]
    if name not in names:
        words = {CALIBRATION: "calibration", EVAL: "evaluation"}
        listing = f"{words[role]} sources: {', '.join(map(_label, names))}"
        if name in SOURCES:
            raise LangpruneError(f"{name!r} is {words[SOURCES.get(name).role]} text, not "
                                 f"{words[role]} text; {listing}")
        raise LangpruneError(f"unknown {words[role]} source {name!r}; {listing}"
                             f"{suggest(name, names)}")
    return SOURCES.get(name)


def sources_for(lang: str, role: str | None = None) -> list[str]:
    """Names of the sources with text in ``lang``, optionally only those of ``role``."""
    language = get_language(lang)
    return [
        n
        for n in SOURCES.names()
        if SOURCES.get(n).has_language(language) and role in (None, SOURCES.get(n).role)
    ]


def check_available(source: str, lang: str) -> TextSource:
    """Validate that ``source`` exists and has ``lang``; cheap, reads no data.

    Raises:
        LangpruneError: unknown source or language, or a source that lacks the language
            (the message lists the sources that have it).
    """
    spec = get_source(source)
    language = get_language(lang)
    if not spec.has_language(language):
        others = [_label(n) for n in sources_for(lang, spec.role)]
        raise LangpruneError(
            f"{spec.role} source {source!r} has no {language.name} ({lang}) text;"
            f" {spec.role} sources with {lang}: {', '.join(others) or 'none'}"
        )
    return spec


def load_documents(source: str, lang: str) -> list[Document]:
    """Load the documents of ``source`` in ``lang``, in source order.

    Raises:
        LangpruneError: unknown source/language, language missing from the source, missing,
            corrupt or non-UTF-8 file (named), or no text at all.
    """
    spec = check_available(source, lang)
    docs = spec.documents(get_language(lang))
    if not docs:
        raise LangpruneError(f"source {source!r} returned no text for {lang}")
    log.debug("loaded %d documents from %s/%s", len(docs), source, lang)
    return docs


def load_eval_sentences(source: str, lang: str) -> list[str]:
    """Load evaluation sentences (FLORES-200 devtest by default) in source order.

    Raises:
        LangpruneError: as :func:`load_documents`, or if ``source`` is not an eval source.
    """
    spec = check_available(source, lang)
    if spec.sentences is None:
        evals = [_label(n) for n in SOURCES.names() if SOURCES.get(n).role == EVAL]
        raise LangpruneError(
            f"{source!r} is a {spec.role} source, not evaluation text; use one of:"
            f" {', '.join(evals)}"
        )
    sentences = spec.sentences(get_language(lang))
    if not sentences:
        raise LangpruneError(f"source {source!r} returned no sentences for {lang}")
    return sentences


# ---- bundled sources ----------------------------------------------------------------------
def _ntrex(lang: Language) -> list[Document]:
    path = bundled_path("ntrex", lang.code)
    records = read_jsonl(path)
    texts = _texts(records, "text", path)
    return _group((_field(r, "doc_id", path, i) for i, r in enumerate(records, 1)), texts)


def _wmt(lang: Language) -> list[Document]:
    # Sentence-level test sets without document ids: each test set file is one document.
    path = bundled_path("wmt", lang.code)
    records = read_jsonl(path)
    texts = _texts(records, "text", path)
    return _group((_field(r, "set", path, i) for i, r in enumerate(records, 1)), texts)


def _tico19(lang: Language) -> list[Document]:
    # Documents are the 19 TICO-19 source documents (prefix of sourceString_id, e.g.
    # "PubMed_8:12" -> "PubMed_8"). The English file has no metadata; it is the English
    # side of the same line-aligned test set, so it borrows the Arabic file's ids.
    path = bundled_path("tico19", lang.code)
    records = read_jsonl(path)
    texts = _texts(records, "text", path)
    meta_path = path
    if "sourceString_id" not in records[0]:
        meta_path = bundled_path("tico19", "ar")
        records = read_jsonl(meta_path)
        if len(records) != len(texts):
            raise LangpruneError(
                f"{path} has {len(texts)} lines but {meta_path} has {len(records)}; they must"
                " be line-aligned"
            )
    ids = (_field(r, "sourceString_id", meta_path, i) for i, r in enumerate(records, 1))
    return _group((s.split(":", 1)[0] for s in ids), texts)


def _tydiqa(lang: Language) -> list[Document]:
    path = bundled_path("tydiqa", lang.code)
    records = read_jsonl(path)
    texts = _texts(records, "context", path)
    return _group((str(r.get("id", i)) for i, r in enumerate(records, 1)), texts)


def _flores_records(lang: Language) -> tuple[list[dict[str, Any]], list[str], Path]:
    path = bundled_path("flores", lang.code)
    records = read_jsonl(path)
    return records, _texts(records, "sentence", path), path


def _flores_documents(lang: Language) -> list[Document]:
    # FLORES sentences come in consecutive runs from one article; its URL is the document.
    records, texts, _ = _flores_records(lang)
    return _group((str(r.get("URL", i)) for i, r in enumerate(records, 1)), texts)


def _flores_sentences(lang: Language) -> list[str]:
    return [t.strip() for t in _flores_records(lang)[1] if t.strip()]


def _label(name: str) -> str:
    return f"{name} (hub)" if SOURCES.get(name).hub else name


def _register_all() -> None:
    """Explicit registration, one line per source (no package scanning)."""
    for spec in (
        TextSource("ntrex", CALIBRATION, False, "NTREX-128 parallel news (default)", _ntrex),
        TextSource("wmt", CALIBRATION, False, "WMT news test sets, native-language side", _wmt),
        TextSource("tico19", CALIBRATION, False, "TICO-19 COVID-domain test set", _tico19),
        TextSource("tydiqa", CALIBRATION, False, "TyDi QA GoldP dev passages", _tydiqa),
        TextSource("mc4", CALIBRATION, True, f"mC4 via {MC4_ID}", _mc4),
        TextSource(
            "flores", EVAL, False, "FLORES-200 devtest", _flores_documents, _flores_sentences
        ),
        TextSource(
            "flores_hub",
            EVAL,
            True,
            f"FLORES+ devtest via {FLORES_PLUS_ID}",
            _flores_hub_documents,
            _flores_hub_sentences,
        ),
        TextSource(
            "belebele_hub",
            EVAL,
            True,
            f"Belebele passages via {BELEBELE_ID}",
            _belebele_passages,
            _belebele_sentences,
        ),
    ):
        SOURCES.add(spec.name, spec)


_register_all()
