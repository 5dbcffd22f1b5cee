"""A sweep with a blend row and a sparsity grid, analysed and reported, on a tiny Gemma 3.

Two calibration languages plus the ``uniform`` blend, each at sparsity 0.2 and 0.5: the
report gets one matrix per sparsity with the blend as a labelled row and the sparsity plot,
and mask IoU compares runs of one sparsity only (a 20% and a 50% mask are not a pair).
"""

from __future__ import annotations

import pandas as pd
import pytest

import jobs.analyze as A
from jobs.report import run_report
from jobs.sweep import run_sweep
from pipeline.config import Config
from tests.stores import tiny_gemma_store
from tracking import runs_table as RT

OVERRIDES = {
    "n_samples": "4", "seq_len": "32", "eval_langs": "de,sw", "eval_tokens": "128",
    "eval_seq_len": "64", "tasks": "", "device": "cpu", "experiment": "t",
    "sweep_langs": "de,sw", "sweep_methods": "wanda", "sweep_sets": "1",
    "sweep_blends": "uniform", "sweep_sparsities": "0.2,0.5",
    "analysis_tokens": "96", "analysis_seq_len": "48", "lape_top_rate": "0.05",
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    with tiny_gemma_store(root) as (_, model_dir, uri):
        cfg = Config.from_overrides({**OVERRIDES, "model": str(model_dir),
                                     "report_dir": str(root / "reports")})
        sweep_id = run_sweep(cfg)
        A.run_analyze(cfg)
        yield {"cfg": cfg, "sweep": RT.load_sweep(sweep_id), "report": run_report(cfg)}


def test_the_grid_has_every_row_at_every_sparsity(env):
    cells = {(m.calib_lang, m.params["sparsity"]) for m in env["sweep"].members}
    assert cells == {(row, s) for row in ("de", "sw", "de+sw") for s in ("0.2", "0.5")}


def test_iou_pairs_runs_of_one_sparsity_only(env):
    pairs = RT.read_csv_artifact(env["sweep"].run_id, f"{RT.IOU_DIR}/pairs.csv")
    sparsity = {m.run_id: m.params["sparsity"] for m in env["sweep"].members}
    assert set(pairs["method"]) == {"wanda_s0.2", "wanda_s0.5"}
    assert len(pairs) == 2 * 3  # three rows per sparsity: three pairs each
    assert all(sparsity[a] == sparsity[b] for a, b in zip(pairs["run_a"], pairs["run_b"]))
    m = RT.R.client().get_run(env["sweep"].run_id).data.metrics
    assert m["iou.random_baseline.wanda_s0.2"] == pytest.approx(0.2 / 1.8)
    assert m["iou.random_baseline.wanda_s0.5"] == pytest.approx(0.5 / 1.5)
    # The sparser masks agree less with each other than the 50% ones, as for random masks.
    assert m["iou.inter.wanda_s0.2"] < m["iou.inter.wanda_s0.5"]


def test_report_has_one_matrix_per_sparsity_with_the_blend_row(env):
    folder = env["report"]
    for s in ("0.2", "0.5"):
        ppl = pd.read_csv(folder / f"ppl_wanda_s{s}.csv", index_col=0)
        assert set(ppl.index) == {"de", "sw", "de+sw", "dense"}  # dense: the reference row
        assert (folder / f"iou_wanda_s{s}.csv").is_file()
    assert (folder / "sparsity_wanda.png").stat().st_size > 0


def test_analysis_figures_keep_the_sparsities_apart(env):
    folder = env["report"]
    for s in ("0.2", "0.5"):
        for name in (f"lsar_agnostic_wanda_s{s}.png", f"lape_removed_wanda_s{s}.png",
                     f"snr_accumulated_wanda_s{s}.png"):
            assert (folder / name).stat().st_size > 0, name
    assert not (folder / "snr_accumulated_wanda.png").exists()  # no figure pools 20% and 50%
    summary = (folder / "summary.md").read_text()
    assert "snr_accumulated_wanda_s0.2.png" in summary and "wanda, sparsity 0.5:" in summary


def test_the_sparsity_plot_has_an_interval_on_every_point(env, tmp_path):
    from analysis.report import _sparsity_bands
    from jobs.report import read_inputs

    inputs = read_inputs(env["sweep"], tmp_path)
    bands = _sparsity_bands(inputs, inputs.runs, "ppl", ["de", "sw"])
    assert set(bands) == {"de", "sw", "de+sw"}
    for row, points in bands.items():
        assert set(points) == {0.2, 0.5}
        runs = inputs.runs[inputs.runs["calib_lang"] == row]
        for s, (low, high) in points.items():
            value = runs[runs["sparsity"] == s][["ppl.de", "ppl.sw"]].to_numpy().mean()
            assert low <= value <= high and low < high, (row, s)
