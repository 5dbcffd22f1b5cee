"""Intervals from per-document and per-window records (analysis/scores.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis import scores
from analysis.stats import wilson_interval


def _records(task: str, lang: str, correct: list[bool], n_choices: int) -> pd.DataFrame:
    ids = [str(i) for i in range(len(correct))]
    return pd.DataFrame({"task": task, "lang": lang, "doc_id": ids,
                         "gold": 0, "pred": [0 if c else 1 for c in correct],
                         "correct": correct, "loglik": [[0.0] * n_choices] * len(correct),
                         "n_choices": n_choices})


def test_task_interval_metrics_are_wilson_per_task_and_language():
    recs = pd.concat([_records("sib200", "sw", [True] * 8 + [False] * 2, 7),
                      _records("xnli", "sw", [True, False, False], 3)])
    m = scores.task_interval_metrics(recs)
    low, high = wilson_interval(8, 10)
    assert m["sib200.sw.ci95_low"] == pytest.approx(low)
    assert m["sib200.sw.ci95_high"] == pytest.approx(high)
    assert (m["sib200.sw.n"], m["xnli.sw.n"]) == (10.0, 3.0)
    assert m["sib200.sw.chance"] == pytest.approx(1 / 7)
    assert m["xnli.sw.chance"] == pytest.approx(1 / 3)


def test_a_task_at_chance_is_flagged_uninformative_in_the_summary():
    recs = pd.concat([_records("sib200", "sw", [True] * 40 + [False] * 10, 7),
                      _records("belebele", "sw", [True] * 13 + [False] * 37, 4)])
    m = {"sib200.sw": 0.8, "belebele.sw": 0.26, "ppl.sw": 50.0,
         **scores.task_interval_metrics(recs)}
    assert scores.informative_tasks(recs) == {"belebele.sw": False, "sib200.sw": True}
    table = scores.summary_table(m, ["sw"], ["sib200", "belebele"], dense={"ppl.sw": 25.0})
    row = table.iloc[0]
    assert row["belebele"].endswith("*") and not row["sib200"].endswith("*")
    assert row["ratio"] == "2.00"
    assert row["sib200"].startswith("0.80 [")
    assert "belebele" in scores.render_summary(table)


def test_ppl_intervals_bracket_the_pooled_perplexity():
    rng = np.random.default_rng(0)
    nll = rng.uniform(300, 500, size=40)
    windows = pd.DataFrame({"lang": "zh", "window": range(40), "nll_sum": nll,
                            "n_tokens": 100, "n_bytes": 300})
    m = scores.ppl_interval_metrics(windows)
    ppl = float(np.exp(nll.sum() / 4000))
    assert m["ppl.zh.ci95_low"] < ppl < m["ppl.zh.ci95_high"]
    # one window has no spread to resample: no interval is claimed
    assert scores.ppl_interval_metrics(windows.iloc[:1]) == {}


def test_ppl_ratio_interval_is_paired_over_the_shared_windows():
    rng = np.random.default_rng(1)
    dense_nll = rng.uniform(300, 500, size=30)  # windows differ a lot in difficulty ...
    pruned_nll = dense_nll * 1.1 + rng.normal(0, 2, size=30)  # ... the pruning cost does not
    frame = {"lang": "sw", "window": range(30), "n_tokens": 100, "n_bytes": 300}
    dense = pd.DataFrame({**frame, "nll_sum": dense_nll})
    pruned = pd.DataFrame({**frame, "nll_sum": pruned_nll})
    m = scores.ppl_ratio_interval_metrics(pruned, dense)
    ratio = float(np.exp((pruned_nll.sum() - dense_nll.sum()) / 3000))
    low, high = m["ppl_ratio.sw.ci95_low"], m["ppl_ratio.sw.ci95_high"]
    assert low < ratio < high
    # Pairing removes the window-difficulty spread: far narrower than the unpaired intervals.
    unpaired = scores.ppl_interval_metrics(pruned)
    assert high - low < 0.2 * (unpaired["ppl.sw.ci95_high"] - unpaired["ppl.sw.ci95_low"]) / \
        float(np.exp(dense_nll.sum() / 3000))
    table = scores.summary_table({"ppl.sw": 1.0, "ppl_ratio.sw": ratio, **m}, ["sw"], [],
                                 dense={"ppl.sw": 1.0})
    assert table.iloc[0]["ratio"].startswith(f"{ratio:.2f} [")
    # Windows that do not pair (another tokenizer) get no interval.
    other = dense.assign(n_tokens=99)
    assert scores.ppl_ratio_interval_metrics(pruned, other) == {}


def test_mean_over_parts_interval_brackets_the_mean_and_narrows_with_more_units():
    rng = np.random.default_rng(2)
    small = [rng.random(40) < p for p in (0.3, 0.7)]
    large = [rng.random(4000) < p for p in (0.3, 0.7)]
    for parts in (small, large):
        low, high = scores.mean_over_parts_interval(parts, "acc")
        assert low < np.mean([p.mean() for p in parts]) < high
    width = [np.subtract(*scores.mean_over_parts_interval(p, "acc")[::-1]) for p in (small, large)]
    assert width[1] < width[0] / 5
    nll = rng.uniform(300, 500, size=20)
    low, high = scores.mean_over_parts_interval([(nll, np.full(20, 100.0))], "ppl")
    assert low < float(np.exp(nll.sum() / 2000)) < high
    with pytest.raises(ValueError, match="kind"):
        scores.mean_over_parts_interval(small, "bleu")
