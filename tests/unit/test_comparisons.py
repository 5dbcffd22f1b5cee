"""Paired target-vs-other comparisons on known inputs (analysis.comparisons)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis import comparisons as C
from analysis import paired as P


def _docs(run_id: str, correct, task="sib200", lang="de", start=0, n_choices=4):
    ids = range(start, start + len(correct))
    return pd.DataFrame({"run_id": run_id, "task": task, "lang": lang, "doc_id": list(ids),
                         "correct": [bool(c) for c in correct], "n_choices": n_choices})


def _windows(run_id: str, nll, lang="de", tokens=10):
    return pd.DataFrame({"run_id": run_id, "lang": lang, "window": range(len(nll)),
                         "nll_sum": nll, "n_tokens": tokens, "n_bytes": 3 * tokens})


def _runs(*rows):
    return pd.DataFrame([{"run_id": r, "method": "wanda", "calib_lang": c, "calib_set": s}
                         for r, c, s in rows])


RUNS = _runs(("t", "de", 0), ("o", "en", 0), ("b", "de+en", 0))


def test_target_better_on_shared_documents_counts_the_dropped_one():
    rng = np.random.default_rng(1)
    target = rng.random(200) < 0.8
    other = rng.random(200) < 0.4
    records = pd.concat([_docs("t", target), _docs("o", np.append(other, True))])
    col = C.column(records, None, RUNS[RUNS.run_id != "b"], "sib200", "de")
    case = col.case
    expected = P.paired_accuracy(target, other).difference
    assert case.other_row == "en" and case.verdict == "better"
    assert case.paired.n == 200 and case.paired.dropped == 1
    assert case.paired.comparison == expected
    assert case.paired.a.value == pytest.approx(target.mean())
    assert col.intervals["en"].n == 201  # a row's own interval covers all its documents


def test_best_other_row_is_chosen_by_point_estimate_and_ties_are_indistinguishable():
    same = [1, 0] * 50
    records = pd.concat([_docs("t", same), _docs("o", [1, 0, 0, 0] * 25), _docs("b", same)])
    case = C.column(records, None, RUNS, "sib200", "de").case
    assert case.other_row == "de+en"  # 0.5 beats en's 0.25
    assert case.verdict == "indistinguishable" and case.paired.comparison.estimate == 0.0


def test_task_at_chance_for_the_dense_model_is_uninformative():
    records = pd.concat([_docs("t", [1] * 100), _docs("o", [0] * 100)])
    dense = _docs("d", [1, 0, 0, 0] * 25).drop(columns="run_id")
    case = C.column(records, dense, RUNS, "sib200", "de").case
    assert case.verdict == "uninformative" and case.chance == 0.25
    assert C.verdicts([case]) == ["uninformative"]
    assert case.vs_dense.estimate == pytest.approx(0.75)


def test_perplexity_ratio_is_the_paired_bootstrap_on_shared_windows():
    a, b = np.full(50, 20.0), np.full(50, 25.0)
    records = pd.concat([_windows("t", a), _windows("o", b)])
    dense = _windows("d", np.full(50, 15.0)).drop(columns="run_id")
    case = C.column(records, dense, RUNS, "ppl", "de").case
    assert case.verdict == "better"
    assert case.paired.comparison.estimate == pytest.approx(math.exp(-0.5))
    assert case.paired.a.value == pytest.approx(math.exp(2.0))
    assert case.vs_dense.estimate == pytest.approx(math.exp(0.5))
    assert case.vs_dense.verdict == "worse"
    assert case.dense.value == pytest.approx(math.exp(1.5))


def test_several_calibration_sets_use_the_two_level_bootstrap():
    runs = _runs(("t0", "de", 0), ("t1", "de", 1), ("o0", "en", 0), ("o1", "en", 1))
    rng = np.random.default_rng(2)
    frames = [_docs(r, rng.random(100) < p) for r, p in
              (("t0", 0.9), ("t1", 0.9), ("o0", 0.2), ("o1", 0.2))]
    case = C.column(pd.concat(frames), None, runs, "sib200", "de").case
    c = case.paired.comparison
    expected = np.mean([f["correct"].mean() for f in frames[:2]]) - np.mean(
        [f["correct"].mean() for f in frames[2:]])
    assert c.method == "bootstrap-sets-docs" and c.n_sets == 2
    assert c.estimate == pytest.approx(expected) and case.verdict == "better"


def test_no_target_row_gives_intervals_but_no_case():
    records = _docs("o", [1, 0] * 10)
    col = C.column(records, None, RUNS, "sib200", "de")
    assert col.case is None and set(col.intervals) == {"en"}
    assert C.column(None, None, RUNS, "sib200", "de").intervals == {}


def test_a_row_sharing_no_document_with_the_target_is_not_compared():
    records = pd.concat([_docs("t", [1, 0] * 10), _docs("o", [1] * 20, start=100),
                         _docs("b", [1, 1, 0, 0] * 5)])
    col = C.column(records, None, RUNS, "sib200", "de")
    assert set(col.versus_target) == {"de+en"} and col.case.other_row == "de+en"
