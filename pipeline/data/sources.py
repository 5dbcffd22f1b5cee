"""Text sources behind one interface: ``load_documents(source, lang) -> list[Document]``.

Bundled sources read the gzip'd JSONL copies under ``data/`` (see ``data/README.md``); hub
sources call ``datasets.load_dataset`` and exist for users with network access. Roles never
overlap: calibration text (NTREX-128 by default; WMT news, TICO-19, TyDi QA passages, mC4)
is disjoint from evaluation text (FLORES-200 devtest), which is what perplexity, LSAR and
LAPE read.

Sample YAML::

    calib_source: ntrex      # ntrex | wmt | tico19 | tydiqa | mc4 (hub)
    eval_source: flores      # flores | flores_hub | belebele_hub (hub)

Hub sources fail fast offline: ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` or an endpoint
that does not answer within :data:`HUB_TIMEOUT_S` seconds gives a one-line
:class:`~pipeline.errors.LangpruneError` before ``datasets`` is even imported.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import threading
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.languages import Language, get_language
from pipeline.errors import LangpruneError
from pipeline.paths import data_dir
from pipeline.registry import Registry, suggest

log = logging.getLogger(__name__)

CALIBRATION = "calibration"
EVAL = "eval"
SENTENCE_JOIN = "\n"  # sentences of one document are joined with a newline

# Bundled name -> folder under data/ (files are <folder>/<lang>.jsonl.gz). Task data is
# listed too so the evaluation code finds its files the same way.
DATASET_DIRS = {
    "ntrex": "ntrex128",
    "wmt": "wmt_news",
    "tico19": "tico19_test",
    "tydiqa": "tydiqa_goldp_dev_contexts",
    "flores": "flores200_devtest",
    "sib200": "sib200",
    "xnli": "xnli_dev",
    "belebele": "belebele",
}
MC4_ID = "allenai/c4"  # mC4 3.1.0 lives in allenai/c4 with one config per language
FLORES_PLUS_ID = "openlanguagedata/flores_plus"  # gated: accept its terms on the hub first
BELEBELE_ID = "facebook/belebele"
# The first MC4_MAX_DOCUMENTS documents of the train split in file order (deterministic);
# about 2-4M tokens per language, enough for 3 sets x 128 windows x 2048 tokens.
MC4_MAX_DOCUMENTS = 5000
HUB_TIMEOUT_S = 5.0  # reachability check before any hub call, so offline fails in seconds
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class Document:
    """One document of running text.

    Attributes:
        doc_id: identifier within its source (news document id, TICO-19 source document,
            TyDi QA passage id, FLORES article URL, ...).
        text: the document's text; sentences joined with ``\\n`` where the source is
            sentence-split.
    """

    doc_id: str
    text: str


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


def bundled_path(name: str, lang: str) -> Path:
    """Path of a bundled file: ``<data_dir>/<folder>/<lang>.jsonl.gz`` (or plain ``.jsonl``).

    Args:
        name: a bundled name (key of :data:`DATASET_DIRS`, e.g. ``ntrex`` or ``xnli``) or a
            folder name under ``data/``.
        lang: language code.
    """
    base = data_dir() / DATASET_DIRS.get(name, name)
    gz = base / f"{lang}.jsonl.gz"
    plain = base / f"{lang}.jsonl"
    return plain if not gz.exists() and plain.exists() else gz


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a (gzip'd) JSONL file into records.

    Raises:
        LangpruneError: naming the file when it is missing, not gzip, truncated, not UTF-8,
            has a line that is not a JSON object, or has no records.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    records: list[dict[str, Any]] = []
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    records.append(_parse_line(line, path, lineno))
    except FileNotFoundError:
        raise LangpruneError(
            f"bundled data file {path} is missing (data folder {data_dir()}; set"
            " LANGPRUNE_DATA to move it)"
        ) from None
    except UnicodeDecodeError as e:
        raise LangpruneError(
            f"{path} is not valid UTF-8 text (byte {e.start}: {e.reason})"
        ) from None
    except (OSError, EOFError, zlib.error) as e:
        raise LangpruneError(f"cannot read {path}: corrupt or truncated file ({e})") from None
    if not records:
        raise LangpruneError(f"{path} is empty: no records")
    return records


# ---- bundled sources ----------------------------------------------------------------------
def _parse_line(line: str, path: Path, lineno: int) -> dict[str, Any]:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise LangpruneError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(rec, dict):
        raise LangpruneError(f"{path}, line {lineno}: expected a JSON object")
    return rec


def _field(rec: dict[str, Any], name: str, path: Path, lineno: int) -> str:
    value = rec.get(name)
    if not isinstance(value, str):
        raise LangpruneError(f"{path}, record {lineno}: field {name!r} missing or not text")
    return value


def _texts(records: list[dict[str, Any]], name: str, path: Path) -> list[str]:
    """The ``name`` field of every record; empty records are an error only if all are empty."""
    texts = [_field(r, name, path, i) for i, r in enumerate(records, 1)]
    if not any(t.strip() for t in texts):
        raise LangpruneError(f"{path}: no text (all {len(texts)} {name!r} fields are empty)")
    return texts


def _group(keys: Iterable[str], texts: list[str]) -> list[Document]:
    """Join the non-empty texts of each key, keeping first-appearance order of keys."""
    grouped: dict[str, list[str]] = {}
    for key, text in zip(keys, texts, strict=True):
        grouped.setdefault(key, [])
        if text.strip():
            grouped[key].append(text.strip())
    return [Document(k, SENTENCE_JOIN.join(v)) for k, v in grouped.items() if v]


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


# ---- hub sources --------------------------------------------------------------------------
_HUB_CONFIG_KEY = {"mc4": "mc4", "flores_hub": "flores_plus", "belebele_hub": "belebele"}


def _require_hub(source: str, role: str) -> None:
    """Fail fast, before importing ``datasets``, when the hub is off or unreachable."""
    alternatives = ", ".join(
        n for n in SOURCES.names() if SOURCES.get(n).role == role and not SOURCES.get(n).hub
    )
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().upper() in _TRUE:
            raise LangpruneError(
                f"source {source!r} needs the Hugging Face hub but {var} is set (offline);"
                f" use a bundled {role} source: {alternatives}"
            )
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    if not _hub_reachable(endpoint, HUB_TIMEOUT_S):
        raise LangpruneError(
            f"source {source!r} needs the Hugging Face hub but {endpoint} is unreachable"
            f" (checked with a {HUB_TIMEOUT_S:g} s timeout); use a bundled {role} source:"
            f" {alternatives}"
        )


def _hub_reachable(endpoint: str, timeout: float) -> bool:
    """Whether ``endpoint`` answers an HTTP HEAD within ``timeout`` seconds (any status).

    Runs in a daemon thread joined with a deadline, because DNS resolution is not bounded
    by the socket timeout. Proxies from the environment are honoured by urllib.
    """
    result: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
            result.append(True)
        except urllib.error.HTTPError:
            result.append(True)  # the server answered, with an error status: reachable
        except (OSError, ValueError):
            result.append(False)

    thread = threading.Thread(target=probe, name="langprune-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(result and result[0])


def _load_hub(source: str, role: str, path: str, config: str, **kwargs: Any) -> Any:
    """``datasets.load_dataset(path, config, **kwargs)`` with the fast offline check first."""
    _require_hub(source, role)
    import datasets  # heavy; imported only when the hub is actually used

    try:
        return datasets.load_dataset(path, config, **kwargs)
    except Exception as e:  # gated, missing config, network drop: one clear line for the user
        raise LangpruneError(
            f"source {source!r}: could not load {path} ({config}):"
            f" {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e


def _mc4(lang: Language) -> list[Document]:
    config = lang.hub["mc4"]
    stream = _load_hub("mc4", CALIBRATION, MC4_ID, config, split="train", streaming=True)
    docs: list[Document] = []
    for i, row in enumerate(stream):
        if i >= MC4_MAX_DOCUMENTS:
            break
        text = str(row.get("text") or "").strip()
        if text:
            docs.append(Document(str(row.get("url") or f"{config}-{i}"), text))
    return docs


def _flores_hub_rows(lang: Language) -> list[dict[str, Any]]:
    config = lang.hub["flores_plus"]
    return list(_load_hub("flores_hub", EVAL, FLORES_PLUS_ID, config, split="devtest"))


def _flores_hub_documents(lang: Language) -> list[Document]:
    rows = _flores_hub_rows(lang)
    texts = [str(r.get("text") or "") for r in rows]
    return _group((str(r.get("url") or i) for i, r in enumerate(rows)), texts)


def _flores_hub_sentences(lang: Language) -> list[str]:
    return [s for s in (str(r.get("text") or "").strip() for r in _flores_hub_rows(lang)) if s]


def _belebele_passages(lang: Language) -> list[Document]:
    # Belebele's passages are FLORES passages: unique passages, keyed by their link.
    rows = _load_hub("belebele_hub", EVAL, BELEBELE_ID, lang.hub["belebele"], split="test")
    passages: dict[str, str] = {}
    for i, row in enumerate(rows):
        text = str(row.get("flores_passage") or "").strip()
        if text:
            passages.setdefault(str(row.get("link") or i), text)
    return [Document(k, v) for k, v in passages.items()]


def _belebele_sentences(lang: Language) -> list[str]:
    return [d.text for d in _belebele_passages(lang)]


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
