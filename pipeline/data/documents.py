"""Documents and the bundled records they are read from, shared by every text source.

A text source (:mod:`pipeline.data.sources`) yields :class:`Document` objects in one of two
roles. This module holds that vocabulary (the roles, :class:`Document`, how sentences are
joined), where the bundled gzip'd JSONL copies live under ``data/`` (see ``data/README.md``),
reading them with errors that name the file, and grouping record texts into documents. The
bundled loaders in :mod:`pipeline.data.sources` and the hub loaders in
:mod:`pipeline.data.hub_sources` both build on it.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import LangpruneError
from pipeline.paths import data_dir

# The two roles of a text source; calibration never reads an eval source.
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
