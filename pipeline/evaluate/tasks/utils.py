"""Dataset loaders for our lm-eval task YAMLs (``custom_dataset: !function utils.load_*``).

lm-eval imports this file by path and calls a loader with the task's ``metadata`` and
``dataset_kwargs`` as keyword arguments (we set ``lang``). Each loader reads the bundled
``data/<dataset>/<lang>.jsonl.gz`` through :func:`pipeline.paths.data_dir` (so
``LANGPRUNE_DATA`` is honoured and the working directory does not matter) and returns a
``datasets.DatasetDict`` built in memory: nothing is downloaded or cached on disk.

Every document carries ``doc_uid``, a string id taken from the data file's own row identity
(the same in every language), for per-document records
(:mod:`pipeline.evaluate.doc_records`): SIB-200 ``index_id``, XNLI ``id``, Belebele
``<link>#<question_number>``.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import datasets

from pipeline.errors import LangpruneError
from pipeline.paths import data_dir

XNLI_LABELS = ("entailment", "neutral", "contradiction")  # lm-eval xnli label order

# The words of lm-eval's upstream xnli prompts (lm_eval/tasks/xnli/utils.py), kept verbatim
# so our scores compare with upstream xnli_<lang>: question word, then the words for
# entailment / neutral / contradiction.
XNLI_WORDS: dict[str, tuple[str, str, str, str]] = {
    "ar": ("صحيح", "نعم", "لذا", "رقم"),
    "de": ("richtig", "Ja", "Auch", "Nein"),
    "en": ("right", "Yes", "Also", "No"),
    "es": ("correcto", "Sí", "Asi que", "No"),
    "fr": ("correct", "Oui", "Aussi", "Non"),
    "hi": ("सही", "हाँ", "इसलिए", "नहीं"),
    "ru": ("правильно", "Да", "Так", "Нет"),
    "sw": ("sahihi", "Ndiyo", "Hivyo", "Hapana"),
    "zh": ("正确", "是的", "所以", "不是的"),
}


def read_rows(dataset: str, lang: str) -> list[dict[str, Any]]:
    """Rows of ``data/<dataset>/<lang>.jsonl.gz`` (LangpruneError naming the file on failure)."""
    path = Path(data_dir()) / dataset / f"{lang}.jsonl.gz"
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise LangpruneError(f"no bundled {dataset} data for language {lang!r} ({path})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LangpruneError(f"cannot read {path}: {e}") from None
    if not rows:
        raise LangpruneError(f"{path} is empty")
    return rows


def load_sib200(lang: str, **_: Any) -> datasets.DatasetDict:
    """SIB-200: the file's ``test`` rows for evaluation (all rows if it has no split column)
    and its ``train`` rows for few-shot examples, each in :func:`stratified_order`."""
    rows = [{**r, "doc_uid": str(r["index_id"])} for r in read_rows("sib200", lang)]
    test = [r for r in rows if r.get("split") == "test"] or rows
    train = [r for r in rows if r.get("split") == "train"] or test
    return datasets.DatasetDict({
        "test": datasets.Dataset.from_list(stratified_order(test)),
        "train": datasets.Dataset.from_list(stratified_order(train)),
    })


def stratified_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Round-robin over categories (sorted), each by ``index_id``: the same in every language.

    The bundled file lists its test rows category by category, so ``limit=8`` would
    evaluate one topic only; interleaving makes any prefix cover the topics evenly.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: (r["category"], int(r["index_id"]))):
        groups.setdefault(r["category"], []).append(r)
    queues = [groups[c] for c in sorted(groups)]
    longest = max(len(q) for q in queues)
    return [q[i] for i in range(longest) for q in queues if i < len(q)]


def load_xnli(lang: str, **_: Any) -> datasets.DatasetDict:
    """XNLI dev: integer labels in lm-eval's order plus the per-language prompt words."""
    if lang not in XNLI_WORDS:
        raise LangpruneError(f"no XNLI prompt words for {lang!r}; known: {', '.join(XNLI_WORDS)}")
    question, yes, also, no = XNLI_WORDS[lang]
    docs = [
        {
            "doc_uid": str(r["id"]),
            "premise": r["premise"],
            "hypothesis": r["hypothesis"],
            "label": XNLI_LABELS.index(r["label"]) if isinstance(r["label"], str) else r["label"],
            "question_word": question,
            "entailment_word": yes,
            "neutral_word": also,
            "contradiction_word": no,
        }
        for r in read_rows("xnli_dev", lang)
    ]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def load_belebele(lang: str, **_: Any) -> datasets.DatasetDict:
    """Belebele: all 900 questions of the language (the whole set is its test split).

    Sorted by (passage link, question number), so that every language lists the same
    questions in the same order and ``limit=n`` evaluates parallel questions.
    """
    rows = sorted(read_rows("belebele", lang), key=lambda r: (r["link"], int(r["question_number"])))
    for r in rows:
        r["correct_answer_num"] = str(r["correct_answer_num"])
        r["doc_uid"] = f"{r['link']}#{r['question_number']}"
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
