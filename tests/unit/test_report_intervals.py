"""The report with per-document and per-window records: intervals, verdicts, grids."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis import report as AR

LANGS = ["de", "sw"]
ROWS = ["de", "sw", "de+sw"]
ACC = {"de": {"de": 0.9, "sw": 0.5}, "sw": {"de": 0.5, "sw": 0.52}, "de+sw": {"de": 0.6, "sw": 0.5}}


def _records(sparsities=(0.5,)):
    runs, docs, windows = [], [], []
    rng = np.random.default_rng(0)
    for s in sparsities:
        for row in ROWS:
            rid = f"{row}-{s}"
            run = {"run_id": rid, "method": "wanda", "calib_lang": row, "calib_set": 0,
                   "sparsity": s}
            for lang in LANGS:
                n = 120 if row != "sw" else 125  # sw was evaluated on 5 extra documents
                correct = rng.random(n) < ACC[row][lang] * (1.5 - s)
                nll = rng.normal(30 if row == lang else 31, 0.5, 40) * (0.5 + s)
                run[f"sib200.{lang}"] = float(correct.mean())
                run[f"ppl.{lang}"] = float(np.exp(nll.sum() / 400))
                docs.append(pd.DataFrame({"run_id": rid, "method": "wanda", "calib_lang": row,
                                          "calib_set": 0, "task": "sib200", "lang": lang,
                                          "doc_id": range(n), "correct": correct,
                                          "n_choices": 4 if lang == "de" else 2}))
                windows.append(pd.DataFrame({"run_id": rid, "method": "wanda", "calib_lang": row,
                                             "calib_set": 0, "lang": lang, "window": range(40),
                                             "nll_sum": nll, "n_tokens": 10, "n_bytes": 30}))
            runs.append(run)
    dense_docs = pd.concat([pd.DataFrame({"task": "sib200", "lang": lang, "doc_id": range(120),
                                          "correct": rng.random(120) < p, "n_choices": c})
                            for lang, p, c in (("de", 0.95, 4), ("sw", 0.5, 2))])
    dense_windows = pd.DataFrame({"lang": np.repeat(LANGS, 40), "window": list(range(40)) * 2,
                                  "nll_sum": 25.0, "n_tokens": 10, "n_bytes": 30})
    dense = {"ppl.de": float(np.exp(2.5)), "ppl.sw": float(np.exp(2.5)), "sib200.de": 0.95,
             "sib200.sw": 0.5}
    return AR.ReportInputs("s", pd.DataFrame(runs), dense=dense, eval_langs=LANGS,
                           tasks=["sib200"], task_docs=pd.concat(docs),
                           ppl_windows=pd.concat(windows), dense_docs=dense_docs,
                           dense_windows=dense_windows)


def test_summary_counts_verdicts_with_intervals_and_names_uninformative_tasks(tmp_path):
    files = {p.name for p in AR.build_report(_records(), tmp_path)}
    text = (tmp_path / "summary.md").read_text()
    assert {"sib200_errorbars_wanda.png", "sib200_wanda_intervals.csv",
            "ppl_wanda_intervals.csv"} <= files
    assert "![Task sib200 with intervals, wanda](sib200_errorbars_wanda.png)" in text
    # sw's dense accuracy includes chance (0.5 of 2 choices): uninformative, not counted
    assert "wanda, tasks: target-language calibration is better in 1, worse in 0, " \
           "indistinguishable in 0 of 1 case; 1 uninformative case not counted." in text
    assert "sw: uninformative for this model (dense accuracy" in text
    assert "wanda, perplexity: target-language calibration is better in 2" in text
    assert "documents dropped: not evaluated in both rows" in text
    assert "by point estimate only: target-language calibration is best (ties included)" in text
    frame = pd.read_csv(tmp_path / "sib200_wanda_intervals.csv")
    cell = frame[(frame.calibration == "de") & (frame.evaluation == "de")].iloc[0]
    assert cell.low < cell.value < cell.high


def test_blend_rows_and_a_sparsity_grid_get_one_matrix_per_sparsity(tmp_path):
    files = {p.name for p in AR.build_report(_records((0.5, 0.7)), tmp_path)}
    assert {"ppl_wanda_s0.5.csv", "ppl_wanda_s0.7.png", "sib200_wanda_s0.7.png",
            "sib200_errorbars_wanda_s0.5.png", "sparsity_wanda.png"} <= files
    matrix = pd.read_csv(tmp_path / "ppl_wanda_s0.5.csv", index_col=0)
    assert list(matrix.index) == ["de", "de+sw", "sw", "dense"]
    text = (tmp_path / "summary.md").read_text()
    assert "wanda, sparsity 0.7, perplexity: target-language calibration is" in text
    assert "![sparsity, wanda](sparsity_wanda.png)" in text


def test_the_same_records_give_byte_identical_files(tmp_path):
    a = AR.build_report(_records(), tmp_path / "a")
    b = AR.build_report(_records(), tmp_path / "b")
    assert [p.name for p in a] == [p.name for p in b]
    for x, y in zip(a, b):
        assert x.read_bytes() == y.read_bytes(), x.name


def test_old_runs_without_records_say_so(tmp_path):
    inputs = _records()
    inputs = AR.ReportInputs("s", inputs.runs, dense=inputs.dense, eval_langs=LANGS,
                             tasks=["sib200"])
    AR.build_report(inputs, tmp_path)
    text = (tmp_path / "summary.md").read_text()
    assert "wanda: no per-document records: no intervals." in text
    assert "ties count as best); no per-document records: no intervals." in text
    assert not (tmp_path / "sib200_errorbars_wanda.png").exists()


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
