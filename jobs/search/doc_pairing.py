"""A task objective's verdict, paired over calibration sets *and* documents.

The per-set objective values give a t-interval over calibration sets only; for a task
objective each verdict run also logged which documents it got right
(``eval/task_docs.parquet``), so blend and target-only are compared on the same documents of
every set with the two-level bootstrap of :func:`analysis.paired.cluster_paired_bootstrap`:
documents vary as well as calibration sets (docs/statistics.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from analysis.paired import cluster_paired_bootstrap
from analysis.stats import Comparison
from pipeline.config import OBJECTIVES_LOWER
from tracking import runs_table as RT
from tracking.logging import TASK_DOCS_ARTIFACT


def task_of(terms: Mapping[str, float]) -> str | None:
    """The bundled task suite of a single-task objective (``sib200``), else None."""
    if len(terms) != 1:
        return None
    term = next(iter(terms))
    return None if term in OBJECTIVES_LOWER or "." in term else term


def read_task_docs(run_id: str) -> pd.DataFrame | None:
    """A run's per-document outcomes; None if it logged none."""
    return RT.read_parquet_artifact(run_id, TASK_DOCS_ARTIFACT)


def correctness_matrices(frames: Sequence[tuple[pd.DataFrame, pd.DataFrame]], task: str,
                         lang: str) -> tuple[np.ndarray, np.ndarray, int]:
    """``[sets, docs]`` 0/1 matrices of blend and target-only on the documents every run of
    every set was scored on (and how many documents that is)."""
    def rows(frame: pd.DataFrame) -> pd.Series:
        sel = frame[(frame["task"] == task) & (frame["lang"] == lang)]
        return sel.set_index("doc_id")["correct"].astype(float)

    pairs = [(rows(b), rows(t)) for b, t in frames]
    common = sorted(set.intersection(*[set(b.index) & set(t.index) for b, t in pairs]))
    blend = np.array([b.loc[common].to_numpy() for b, _ in pairs])
    target = np.array([t.loc[common].to_numpy() for _, t in pairs])
    return blend, target, len(common)


def paired_over_documents(task: str, lang: str, pairs: Sequence[Mapping[str, Any]],
                          seed: int = 0) -> tuple[Comparison, int] | None:
    """Blend minus target-only accuracy over sets and documents; None when the records
    are missing or fewer than two sets finished."""
    done = [p for p in pairs if "error" not in p]
    if len(done) < 2:
        return None
    frames = []
    for p in done:
        b, t = read_task_docs(p["blend_run"]), read_task_docs(p["target_only_run"])
        if b is None or t is None:
            return None
        frames.append((b, t))
    blend, target, n_docs = correctness_matrices(frames, task, lang)
    if n_docs == 0:
        return None
    return cluster_paired_bootstrap(blend, target, higher_is_better=True, seed=seed), n_docs
