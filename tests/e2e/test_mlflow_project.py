"""The researcher's path end to end: ``mlflow run . -P calib_lang=..`` twice against a real
``mlflow server``, then the runs in the MLflow UI (headless Chromium) and through MlflowClient."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.servers import ROOT, VENV_BIN, compare_metrics, headless, page_screenshot, runs_table

pytestmark = pytest.mark.e2e

# The embedded default model (gemma-3-270m, 18 decoder layers) on small but real budgets: the
# screenshots this test takes are the README's, so they show a real model's numbers. Measured:
# the whole test takes about 5 min on 2 shared CPU cores (model already in the cache).
SMALL = {
    "n_samples": "8", "seq_len": "128", "eval_langs": "de,en,zh", "eval_tokens": "256",
    "tasks": "sib200", "limit": "20",
}
EVAL_LANGS = SMALL["eval_langs"].split(",")
N_LAYERS = 18  # gemma-3-270m


def _env(server) -> dict[str, str]:
    # LANGPRUNE_CACHE is left as it is (default ~/.cache/langprune, not a tmp folder): the
    # embedded GGUF is dequantised into it once per machine (about a minute), later runs reuse it.
    return {**os.environ, "MLFLOW_TRACKING_URI": server.url, "PYTHONPATH": str(ROOT),
            "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}


def mlflow_run(server, calib_lang: str) -> subprocess.CompletedProcess:
    args = [str(VENV_BIN / "mlflow"), "run", str(ROOT), "--env-manager", "local",
            "--experiment-name", "e2e", "-P", f"calib_lang={calib_lang}"]  # default model
    for k, v in SMALL.items():
        args += ["-P", f"{k}={v}"]
    return subprocess.run(args, env=_env(server), capture_output=True, text=True, timeout=900)


def pipeline_cli(server, command: str, **kv: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "pipeline", command, "experiment=e2e",
            *(f"{k}={v}" for k, v in kv.items())]
    return subprocess.run(args, env=_env(server), cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


def test_two_calibration_languages_compared(mlflow_server, tmp_path):
    for lang in ("zh", "de"):
        proc = mlflow_run(mlflow_server, lang)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id], "tags.`langprune.state` = 'complete'")
    pruned = {r.data.params["calib_lang"]: r for r in runs
              if r.data.tags["langprune.kind"] == "pruned"}
    dense = [r for r in runs if r.data.tags["langprune.kind"] == "dense"]
    assert set(pruned) == {"zh", "de"}
    assert len(dense) == 1, "the dense baseline runs once and is reused"

    for lang, run in pruned.items():
        p, m, t = run.data.params, run.data.metrics, run.data.tags
        assert run.info.status == "FINISHED"
        assert run.info.run_name == f"wanda-0.5-{lang}-set0"
        assert p["blend"] == f"{lang}:1.0" and p["method"] == "wanda"
        assert p["n_samples"] == "8" and p["seq_len"] == "128" and p["model"] == "gemma-3-270m"
        assert t["langprune.dense_run"] == dense[0].info.run_id
        for ev in EVAL_LANGS:
            assert m[f"ppl.{ev}"] > 1 and m[f"bpb.{ev}"] > 0
            ratio = m[f"ppl.{ev}"] / dense[0].data.metrics[f"ppl.{ev}"]
            assert m[f"ppl_ratio.{ev}"] == pytest.approx(ratio, rel=1e-9)
            assert 0.0 <= m[f"sib200.{ev}"] <= 1.0
        assert m["sparsity.actual"] == pytest.approx(0.5, abs=0.01)
        layer_hist = client.get_metric_history(run.info.run_id, "sparsity.layer")
        assert sorted(h.step for h in layer_hist) == list(range(N_LAYERS))
        arts = _artifacts(client, run.info.run_id)
        for need in ("config.yaml", "masks/masks.safetensors", "tables/sparsity_modules.csv",
                     "calibration/manifest.json", "eval/lm_eval_results.json",
                     "plots/ppl_vs_dense.png"):
            assert need in arts, f"{need} missing from {sorted(arts)}"
        manifest = json.loads(Path(client.download_artifacts(
            run.info.run_id, "calibration/manifest.json", str(tmp_path))).read_text())
        assert json.dumps(manifest).count(lang) > 0
        contexts = {i.tags[0].value for i in run.inputs.dataset_inputs}
        assert contexts == {"calibration", "evaluation"}
        assert t["version.torch"] and t["langprune.git_commit"] and t["langprune.config_hash"]

    # The same config again is reused, not recomputed.
    proc = mlflow_run(mlflow_server, "zh")
    assert proc.returncode == 0 and pruned["zh"].info.run_id in proc.stdout + proc.stderr
    after = client.search_runs([exp.experiment_id], "tags.`langprune.state` = 'complete'")
    assert len(after) == len(runs)

    # A sweep over the same two cells reuses both runs (same configs), then its report.
    proc = pipeline_cli(mlflow_server, "sweep", sweep_langs="de,zh", sweep_methods="wanda",
                        **SMALL)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert pruned["zh"].info.run_id in out and pruned["de"].info.run_id in out, out[-3000:]
    sweeps = client.search_runs([exp.experiment_id], "tags.`langprune.kind` = 'sweep'")
    assert len(sweeps) == 1
    members = json.loads(Path(client.download_artifacts(
        sweeps[0].info.run_id, "sweep/members.json", str(tmp_path))).read_text())["members"]
    assert {m["run_id"] for m in members} == {r.info.run_id for r in pruned.values()}
    assert all(m["reused"] == "true" for m in members)
    proc = pipeline_cli(mlflow_server, "report", report_dir=str(tmp_path / "reports"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = tmp_path / "reports" / sweeps[0].info.run_id / "summary.html"
    assert summary.is_file()

    # The UI, in a real browser: the runs table lists both runs with calib_lang, ppl.<lang>
    # and sib200.<lang> ...
    shot_dir = Path(os.environ.get("LANGPRUNE_SCREENSHOT_DIR", tmp_path))
    columns = ["calib_lang", *(f"ppl.{ev}" for ev in EVAL_LANGS),
               *(f"sib200.{ev}" for ev in EVAL_LANGS)]
    rows = runs_table(mlflow_server.url, exp.experiment_id, "tags.`langprune.kind` = 'pruned'",
                      columns, screenshot=shot_dir / "runs_table.png")
    text = "\n".join(rows)
    assert "wanda-0.5-zh-set0" in text and "wanda-0.5-de-set0" in text
    cells = [r.split("\n") for r in rows]
    for lang, run in pruned.items():
        ppl = run.data.metrics["ppl.zh"]
        assert any(lang in c and repr(ppl) in c for c in cells), (
            f"no row shows calib_lang={lang} with ppl.zh={ppl}: {rows}")
    # ... and the compare page shows their params and metrics side by side; the screenshot is
    # its parallel-coordinates plot of calib_lang against ppl.<lang> (a line per run through
    # its values; the assistant panel closed).
    ids = [pruned["zh"].info.run_id, pruned["de"].info.run_id]
    q = urllib.parse.quote
    compare = (f"{mlflow_server.url}/#/compare-runs?runs={q(json.dumps(ids))}"
               f"&experiments={q(json.dumps([exp.experiment_id]))}")
    page = compare_metrics(compare, ["calib_lang"], [f"ppl.{ev}" for ev in EVAL_LANGS],
                           screenshot=shot_dir / "compare_runs.png")
    assert "calib_lang" in page and "ppl.zh" in page
    dom = headless(compare, tmp_path)
    assert "calib_lang" in dom and "ppl.zh" in dom and "ppl_ratio.de" in dom

    # The sweep's report, rendered in Chromium.
    body = page_screenshot(summary.as_uri(), shot_dir / "report_summary.png")
    assert sweeps[0].info.run_id in body and "zh" in body and "de" in body


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for f in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out
