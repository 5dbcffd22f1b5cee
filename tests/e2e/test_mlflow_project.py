"""The researcher's path end to end: ``mlflow run . -P calib_lang=..`` twice against a real
``mlflow server``, then the runs in the MLflow UI (headless Chromium) and through MlflowClient."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.parse
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.servers import ROOT, VENV_BIN, headless, runs_table

pytestmark = pytest.mark.e2e

SMALL = {  # a small test config: tiny model, few windows, short evaluation
    "n_samples": "4", "seq_len": "32", "eval_langs": "de,zh", "eval_tokens": "256",
    "tasks": "sib200", "limit": "2",
}


def mlflow_run(server, model_dir: Path, calib_lang: str, tmp: Path) -> subprocess.CompletedProcess:
    args = [str(VENV_BIN / "mlflow"), "run", str(ROOT), "--env-manager", "local",
            "--experiment-name", "e2e", "-P", f"calib_lang={calib_lang}",
            "-P", f"model={model_dir}"]
    for k, v in SMALL.items():
        args += ["-P", f"{k}={v}"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.url,
           "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "LANGPRUNE_CACHE": str(tmp / "cache")}
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)


def test_two_calibration_languages_compared(mlflow_server, tiny_model_dir, tmp_path):
    for lang in ("zh", "de"):
        proc = mlflow_run(mlflow_server, tiny_model_dir, lang, tmp_path)
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
        assert p["n_samples"] == "4" and p["seq_len"] == "32" and p["model"] == str(tiny_model_dir)
        assert t["langprune.dense_run"] == dense[0].info.run_id
        for ev in ("de", "zh"):
            assert m[f"ppl.{ev}"] > 1 and m[f"bpb.{ev}"] > 0
            ratio = m[f"ppl.{ev}"] / dense[0].data.metrics[f"ppl.{ev}"]
            assert m[f"ppl_ratio.{ev}"] == pytest.approx(ratio, rel=1e-9)
            assert 0.0 <= m[f"sib200.{ev}"] <= 1.0
        assert m["sparsity.actual"] == pytest.approx(0.5, abs=0.01)
        layer_hist = client.get_metric_history(run.info.run_id, "sparsity.layer")
        assert sorted(h.step for h in layer_hist) == [0, 1]
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
    proc = mlflow_run(mlflow_server, tiny_model_dir, "zh", tmp_path)
    assert proc.returncode == 0 and pruned["zh"].info.run_id in proc.stdout + proc.stderr
    after = client.search_runs([exp.experiment_id], "tags.`langprune.state` = 'complete'")
    assert len(after) == len(runs)

    # The UI, in a real browser: the runs table lists both runs with calib_lang and ppl.zh ...
    shot_dir = Path(os.environ.get("LANGPRUNE_SCREENSHOT_DIR", tmp_path))
    rows = runs_table(mlflow_server.url, exp.experiment_id, "tags.`langprune.kind` = 'pruned'",
                      ["calib_lang", "ppl.zh"], screenshot=shot_dir / "runs_table.png")
    text = "\n".join(rows)
    assert "wanda-0.5-zh-set0" in text and "wanda-0.5-de-set0" in text
    cells = [r.split("\n") for r in rows]
    for lang, run in pruned.items():
        ppl = run.data.metrics["ppl.zh"]
        assert any(c[-2:] == [lang, repr(ppl)] or c[-2:] == [repr(ppl), lang] for c in cells), (
            f"no row shows calib_lang={lang} with ppl.zh={ppl}: {rows}")
    # ... and the compare page shows their params and metrics side by side.
    ids = [pruned["zh"].info.run_id, pruned["de"].info.run_id]
    q = urllib.parse.quote
    compare = (f"{mlflow_server.url}/#/compare-runs?runs={q(json.dumps(ids))}"
               f"&experiments={q(json.dumps([exp.experiment_id]))}")
    dom = headless(compare, tmp_path, screenshot=shot_dir / "compare_runs.png")
    assert "calib_lang" in dom and "ppl.zh" in dom and "ppl_ratio.de" in dom


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for f in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out
