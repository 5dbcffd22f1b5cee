"""sweep -> analyze -> report on a tiny Gemma 3 with a byte tokenizer and a SQLite store.

One module-scoped sweep (wanda, two calibration languages x two calibration sets, three
evaluation languages) is analysed, then re-analysed (skip, then force), and reported twice.
Numbers are checked against independent recomputations where that is cheap: IoU from the
unpacked masks, accumulated SNR and LAPE counts from plain full-model forwards with hooks.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

import jobs.analyze as A
from analysis import report as AR
from analysis import text as T
from analysis.snr import snr_db
from jobs.report import run_report
from jobs.sweep import run_sweep
from pipeline.config import Config
from pipeline.errors import LangpruneError
from pipeline.masks import apply_masks, load_masks
from pipeline.models import decoder_layers
from tests.stores import tiny_gemma_store
from tracking import runs_table as RT

LANGS = ["de", "en", "sw"]
OVERRIDES = {
    "n_samples": "4", "seq_len": "32", "eval_langs": ",".join(LANGS), "eval_tokens": "128",
    "eval_seq_len": "64", "tasks": "", "device": "cpu", "experiment": "t",
    "sweep_langs": "de,sw", "sweep_methods": "wanda", "sweep_sets": "2",
    "analysis_tokens": "96", "analysis_seq_len": "48", "lape_top_rate": "0.05",
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny Gemma 3 folder, a SQLite store, a cache folder; the sweep run and analysed."""
    root = tmp_path_factory.mktemp("analyze")
    with tiny_gemma_store(root) as (mp, model_dir, uri):
        cfg = Config.from_overrides({**OVERRIDES, "model": str(model_dir)})
        calls = []
        original = A.compute_dense_reference
        mp.setattr(A, "compute_dense_reference",
                   lambda *a, **k: calls.append(1) or original(*a, **k))
        sweep_id = run_sweep(cfg)
        A.run_analyze(cfg)
        yield {"root": root, "cfg": cfg, "sweep": sweep_id, "client": MlflowClient(uri),
               "model_dir": model_dir, "dense_calls": calls}


def _sweep(env) -> RT.Sweep:
    return RT.load_sweep(env["sweep"])


def _masks(env, run_id: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    return load_masks(RT.download_masks(run_id, tmp_path))


def test_iou_matches_unpacked_masks(env, tmp_path):
    sweep = _sweep(env)
    assert len(sweep.members) == 4
    masks = {m.run_id: _masks(env, m.run_id, tmp_path) for m in sweep.members}

    def iou(a: str, b: str) -> float:
        inter = sum(int((masks[a][k] & masks[b][k]).sum()) for k in masks[a])
        union = sum(int((masks[a][k] | masks[b][k]).sum()) for k in masks[a])
        return inter / union

    by_lang = {lang: [m.run_id for m in sweep.members if m.calib_lang == lang]
               for lang in ("de", "sw")}
    intra = [iou(*by_lang["de"]), iou(*by_lang["sw"])]
    inter = [iou(a, b) for a in by_lang["de"] for b in by_lang["sw"]]
    metrics = env["client"].get_run(env["sweep"]).data.metrics
    assert metrics["iou.intra.wanda"] == pytest.approx(np.mean(intra), rel=1e-12)
    assert metrics["iou.inter.wanda"] == pytest.approx(np.mean(inter), rel=1e-12)
    assert metrics["iou.random_baseline"] == pytest.approx(1 / 3)
    pairs = RT.read_csv_artifact(env["sweep"], "iou/pairs.csv")
    assert len(pairs) == 6
    matrix = RT.read_csv_artifact(env["sweep"], "iou/matrix_wanda.csv").set_index("lang_a")
    assert matrix.loc["de", "de"] == pytest.approx(intra[0])
    assert matrix.loc["de", "sw"] == pytest.approx(np.mean(inter))
    layers = RT.read_csv_artifact(env["sweep"], "iou/layers.csv")
    pooled = layers.groupby(["run_a", "run_b"])[["intersection", "union"]].sum()
    for row in pairs.itertuples():  # per-layer tables add up to the overall pair IoU
        inter_sum, union_sum = pooled.loc[(row.run_a, row.run_b)]
        assert inter_sum / union_sum == pytest.approx(row.iou, rel=1e-12)
    assert {"heatmap_wanda.png", "modules.csv", "module_types.csv"} <= {
        p.rsplit("/", 1)[1] for p in RT.list_artifacts(env["sweep"], "iou")}


def _windows(env) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    from pipeline.data.sources import load_eval_sentences

    tok = AutoTokenizer.from_pretrained(env["model_dir"])
    return {lang: T.analysis_windows(tok, load_eval_sentences("flores", lang), 96, 48)
            for lang in LANGS}


def _layer_outputs(model, ids: torch.Tensor, gate: dict | None = None) -> list[torch.Tensor]:
    """Decoder-layer outputs of a plain forward pass; optionally counts gate_proj > 0."""
    outs: list[torch.Tensor] = []
    layers = decoder_layers(model)
    handles = [layer.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(
        o, tuple) else o)) for layer in layers]
    if gate is not None:
        for i, layer in enumerate(layers):
            handles.append(layer.mlp.gate_proj.register_forward_hook(
                lambda m, a, o, i=i: gate.__setitem__(i, gate.get(i, 0) + (o > 0).sum(0).sum(0))))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return outs


def test_snr_and_lape_match_plain_forward_passes(env, tmp_path):
    from transformers import AutoModelForCausalLM

    member = _sweep(env).members[0]
    dense = AutoModelForCausalLM.from_pretrained(env["model_dir"]).eval()
    pruned = AutoModelForCausalLM.from_pretrained(env["model_dir"]).eval()
    apply_masks(pruned, _masks(env, member.run_id, tmp_path))
    snr = RT.read_csv_artifact(member.run_id, RT.SNR_TABLE)
    dense_counts = RT.download_artifact(env["sweep"], RT.DENSE_LAPE_COUNTS, tmp_path / "d")
    from safetensors.torch import load_file

    counts = load_file(str(dense_counts))
    for k, (lang, ids) in enumerate(_windows(env).items()):
        gate: dict = {}
        d_out = _layer_outputs(dense, ids, gate)
        p_out = _layer_outputs(pruned, ids)
        acc = snr[(snr["kind"] == "accumulated") & (snr["eval_lang"] == lang)].sort_values("layer")
        expected = [snr_db(d, p) for d, p in zip(d_out, p_out)]
        np.testing.assert_allclose(acc["snr_db"], expected, rtol=1e-4)
        for layer, c in gate.items():
            assert torch.equal(counts["over_zero"][k, layer], c.to(torch.int64))
        assert (counts["tokens"][k] == ids.numel()).all()
    local = snr[snr["kind"] == "local"].set_index(["eval_lang", "layer"])["snr_db"]
    first = snr[(snr["kind"] == "accumulated") & (snr["layer"] == 0)]
    for row in first.itertuples():  # layer 0 gets the same (dense) input either way
        assert local[(row.eval_lang, 0)] == pytest.approx(row.snr_db, rel=1e-9)
    assert all(local[(lang, 3)] > 0 for lang in LANGS)


def test_headline_metrics_summarise_the_logged_tables(env):
    client = env["client"]
    for member in _sweep(env).members:
        run = client.get_run(member.run_id)
        assert run.data.tags[RT.TAG_ANALYSIS] == "done"
        assert run.data.tags["langprune.analysis.weights"] == "dense x mask"
        m = run.data.metrics
        lsar = RT.read_csv_artifact(member.run_id, RT.LSAR_TABLE)
        assert sorted(set(lsar["eval_lang"])) == LANGS and len(lsar) == 3 * 4
        for lang, group in lsar.groupby("eval_lang"):
            assert m[f"lsar.agnostic.{lang}"] == pytest.approx(group["agnostic"].mean())
            assert m[f"lsar.specific.{lang}"] == pytest.approx(group["specific"].mean())
        assert (lsar[["agnostic", "specific"]] > 0).all().all()
        lape = RT.read_csv_artifact(member.run_id, RT.LAPE_TABLE)
        assert list(lape["lang"]) == LANGS
        assert 0.3 < m["lape.removed.all"] < 0.7  # ~ the 50% sparsity of the FFN weights
        for name in ("snr_acc.band.late.de", "snr_local.band.early", "lsar.rel.agnostic",
                     "lsar.rel.specific.band.middle.sw"):
            assert m[f"{name}.ci95_low"] <= m[name] <= m[f"{name}.ci95_high"], name
        for lang in LANGS:
            assert m[f"lape.removed.{lang}.ci95_low"] <= m[f"lape.removed.{lang}.ci95_high"]
        assert run.data.tags["langprune.analysis.lsar_source"] == "flores"  # sw: no Belebele
        history = client.get_metric_history(member.run_id, f"snr_acc.{LANGS[0]}")
        assert sorted(h.step for h in history) == [0, 1, 2, 3]


def test_analyze_skips_done_runs_and_reuses_the_dense_cache(env):
    cache = list((env["root"] / "cache" / "analysis").iterdir())
    assert len(cache) == 1 and env["dense_calls"] == [1]
    files = {p.name: p.stat().st_mtime_ns for p in cache[0].iterdir()}
    assert set(files) == {"meta.json", "lsar_states.safetensors", "lsar_bases.safetensors",
                          "lape_counts.safetensors"}
    client = env["client"]
    member = _sweep(env).members[0].run_id
    before = len(client.get_metric_history(member, "time.analysis_s"))
    A.run_analyze(env["cfg"])  # everything done: nothing recomputed
    assert len(client.get_metric_history(member, "time.analysis_s")) == before
    A.run_analyze(env["cfg"].replace(force="true"))  # recomputed, dense side from cache
    assert len(client.get_metric_history(member, "time.analysis_s")) == before + 1
    assert env["dense_calls"] == [1]
    assert {p.name: p.stat().st_mtime_ns for p in cache[0].iterdir()} == files


def test_report_is_byte_identical_and_matches_the_store(env):
    cfg = env["cfg"]
    first = run_report(cfg.replace(report_dir=str(env["root"] / "r1")))
    second = run_report(cfg.replace(report_dir=str(env["root"] / "r2")))
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert {"ppl_wanda.csv", "ppl_wanda.png", "iou_wanda.png", "lsar_agnostic_wanda.png",
            "lape_hist_wanda.png", "snr_accumulated_wanda.png", "summary.md",
            "summary.html"} <= set(names)
    ppl = pd.read_csv(first / "ppl_wanda.csv", index_col=0)
    client = env["client"]
    for member in _sweep(env).members:
        assert client.get_run(member.run_id).data.metrics["ppl.de"] > 0
    de_runs = [client.get_run(m.run_id).data.metrics["ppl.sw"] for m in _sweep(env).members
               if m.calib_lang == "de"]
    assert ppl.loc["de", "sw"] == pytest.approx(np.mean(de_runs), rel=1e-5)
    summary = (first / "summary.md").read_text()
    assert "target-language calibration is best (ties included) for" in summary
    # the members' per-window records give intervals and paired verdicts (two sets per row)
    assert "ppl_wanda_intervals.csv" in names
    assert "wanda, perplexity: target-language calibration is better in" in summary
    assert "(bootstrap-sets-docs)" in summary
    intervals = pd.read_csv(first / "ppl_wanda_intervals.csv")
    assert (intervals["low"] <= intervals["value"]).all()
    assert (intervals["value"] <= intervals["high"]).all()
    assert "is highest when calibrated on L in" in summary
    assert "agnostic loss concentrated in middle-to-late layers:" in summary
    assert "removed share of a language's specific neurons, own-language minus" in summary
    logged = {p.rsplit("/", 1)[1] for p in RT.list_artifacts(env["sweep"], "report")}
    assert set(names) <= logged


def test_wrong_sweep_run_is_a_clear_error(env):
    member = _sweep(env).members[0].run_id
    with pytest.raises(LangpruneError, match="not a sweep parent"):
        A.run_analyze(env["cfg"].replace(sweep_run=member))
    with pytest.raises(LangpruneError, match="does not exist"):
        run_report(env["cfg"].replace(sweep_run="0" * 32))


def _runs() -> pd.DataFrame:
    rows = []
    values = {("ru", "sw"): 23.1, ("sw", "sw"): 24.0, ("ru", "ru"): 10.0, ("sw", "ru"): 12.0}
    acc = {("ru", "sw"): 0.5, ("sw", "sw"): 0.5, ("ru", "ru"): 0.75, ("sw", "ru"): 0.25}
    for k, calib in enumerate(["ru", "sw"]):
        row = {"run_id": f"r{k}", "method": "wanda", "calib_lang": calib, "calib_set": 0}
        row.update({f"ppl.{e}": values[(calib, e)] for e in ("ru", "sw")})
        row.update({f"sib200.{e}": acc[(calib, e)] for e in ("ru", "sw")})
        rows.append(row)
    return pd.DataFrame(rows)


def test_summary_states_where_another_language_wins(tmp_path):
    inputs = AR.ReportInputs("s", _runs(), dense={"ppl.ru": 8.0, "ppl.sw": 20.0},
                             eval_langs=["ru", "sw"], tasks=["sib200"])
    files = AR.build_report(inputs, tmp_path)
    text = (tmp_path / "summary.md").read_text()
    assert "sw: calibrating on ru gives ppl 23.10 vs 24.00 with sw" in text
    assert "best (ties included) for 1 of 2 evaluation languages (ru)" in text  # ppl
    assert "for 2 of 2 evaluation languages (ru, sw; tied: sw)" in text  # sib200 tie on sw
    assert "lowest perplexity in 1 of 2" in text and "best task score in 2 of 2" in text
    assert {"ppl_wanda.png", "sib200_wanda.png", "summary.html"} <= {p.name for p in files}
    matrix = pd.read_csv(tmp_path / "ppl_wanda.csv", index_col=0)
    assert matrix.loc["dense", "sw"] == 20.0 and matrix.loc["ru", "sw"] == 23.1
    assert not math.isnan(AR.metric_matrix(_runs(), "wanda", "sib200", ["ru"]).loc["sw", "ru"])
