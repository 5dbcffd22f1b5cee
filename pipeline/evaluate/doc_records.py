"""Per-document outcomes of multiple-choice tasks, from lm-eval's logged samples.

One row per (task, document), in :data:`COLUMNS`:

- ``task``: our score-key prefix (``sib200``, ``xnli``, ``belebele``) for the bundled tasks,
  else lm-eval's task name; ``lang``: the evaluation language (None for other tasks);
- ``doc_id``: a stable id *from the data*, never the position in lm-eval's document list
  (the bundled loaders order documents for even coverage, so a position means nothing
  outside one run). The first present of :data:`ID_FIELDS`, as a string. The bundled loaders
  (``tasks/utils.py``) set ``doc_uid``: SIB-200 ``index_id`` (the FLORES-based row id),
  XNLI ``id`` (the dev row id), Belebele ``<link>#<question_number>`` (passage URL and
  question 1 or 2). All three are the same across languages, so rows join across languages;
- ``gold`` (index of the right choice), ``pred`` (argmax of ``loglik``, first on ties, as
  lm-eval's ``acc``), ``correct`` (``pred == gold``), ``loglik`` (one float per choice, nats),
  ``n_choices``.

A task without any of :data:`ID_FIELDS` in its documents is refused (:func:`doc_uid` raises).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from pipeline.errors import LangpruneError

COLUMNS = ("task", "lang", "doc_id", "gold", "pred", "correct", "loglik", "n_choices")
# Per-document id fields, in order of preference ("doc_uid" is set by our loaders; the
# others are the usual names in upstream lm-eval datasets, e.g. arc's "id").
ID_FIELDS = ("doc_uid", "id", "index_id", "question_id")


def doc_uid(task: str, doc: dict[str, Any]) -> str:
    """The stable id of one document of ``task``.

    Raises:
        LangpruneError: when the document has none of :data:`ID_FIELDS`.
    """
    for name in ID_FIELDS:
        if doc.get(name) not in (None, ""):
            return str(doc[name])
    raise LangpruneError(
        f"task {task} has no per-document id (none of {', '.join(ID_FIELDS)} in its documents); "
        f"per-document records need one"
    )


def sample_row(task: str, lang: str | None, sample: dict[str, Any]) -> dict[str, Any]:
    """One record from one lm-eval logged sample of a multiple-choice task."""
    loglik = [float(resp[0]) for resp in sample["filtered_resps"]]
    pred = max(range(len(loglik)), key=lambda i: (loglik[i], -i))  # first maximum
    gold = int(sample["target"])
    return {"task": task, "lang": lang, "doc_id": doc_uid(task, sample["doc"]), "gold": gold,
            "pred": pred, "correct": pred == gold, "loglik": loglik, "n_choices": len(loglik)}


def records_frame(samples: dict[str, list[dict[str, Any]]], keys: dict[str, str],
                  output_types: dict[str, str]) -> pd.DataFrame:
    """Records of every multiple-choice task in lm-eval's ``results["samples"]``.

    Args:
        samples: lm-eval task name -> its logged samples (``log_samples=True``).
        keys: Our task names -> ``<suite>.<lang>`` score keys (other tasks keep their name).
        output_types: Task name -> lm-eval ``output_type``; only ``multiple_choice`` tasks
            give records (others have no choices to score).

    Returns:
        A DataFrame with :data:`COLUMNS`, rows in task order then lm-eval's document order.
    """
    rows: list[dict[str, Any]] = []
    for name, task_samples in samples.items():
        if output_types.get(name) != "multiple_choice":
            continue
        task, _, lang = keys[name].partition(".") if name in keys else (name, "", "")
        rows.extend(sample_row(task, lang or None, s) for s in task_samples)
    return pd.DataFrame(rows, columns=list(COLUMNS))


def chance_levels(records: pd.DataFrame) -> pd.Series:
    """Expected accuracy of uniform guessing per (task, lang): mean of 1 / n_choices."""
    return (1.0 / records["n_choices"]).groupby(
        [records["task"], records["lang"].fillna("")]).mean().rename("chance")
