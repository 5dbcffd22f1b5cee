"""The task-objective verdict pairs blend and target-only over sets and documents."""

from __future__ import annotations

import numpy as np
import pandas as pd

from jobs.search.doc_pairing import correctness_matrices, task_of


def _docs(correct: list[int], ids: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"task": "sib200", "lang": "sw", "doc_id": ids,
                         "correct": [bool(c) for c in correct]})


def test_single_task_objectives_only():
    assert task_of({"sib200": 1.0}) == "sib200"
    assert task_of({"ppl": 1.0}) is None
    assert task_of({"arc_easy.acc": 1.0}) is None  # not a bundled suite with records per lang
    assert task_of({"ppl": 0.5, "sib200": 1.0}) is None


def test_matrices_keep_only_documents_every_run_scored_in_the_same_order():
    set0 = (_docs([1, 0, 1], ["a", "b", "c"]), _docs([0, 0, 1], ["c", "b", "a"]))
    set1 = (_docs([1, 1], ["b", "a"]), _docs([1, 0, 1], ["a", "b", "c"]))
    blend, target, n = correctness_matrices([set0, set1], "sib200", "sw")
    assert n == 2  # "c" is missing from set 1's blend run
    np.testing.assert_array_equal(blend, [[1, 0], [1, 1]])  # doc order a, b
    np.testing.assert_array_equal(target, [[1, 0], [1, 0]])
