"""The real embedded default (Gemma 3 270M) end to end: prune + evaluate + tracking.

Marked slow (minutes on 2 CPU cores); run with ``pytest -m slow tests/e2e``.
"""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from jobs.main import run_main
from pipeline.config import Config

pytestmark = pytest.mark.slow


def test_main_job_on_the_embedded_default(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    cfg = Config.from_overrides({"calib_lang": "sw", "n_samples": "8", "eval_langs": "en,sw",
                                 "eval_tokens": "512", "tasks": "sib200", "limit": "2",
                                 "device": "cpu"})
    result = run_main(cfg)
    run = MlflowClient(uri).get_run(result.run_id)
    m = run.data.metrics
    assert run.data.tags["langprune.state"] == "complete"
    # 50% of every decoder-layer matrix, on top of the ~2% exact zeros of the 4-bit weights
    assert m["sparsity.actual"] == pytest.approx(0.5, abs=0.002)
    for lang in ("en", "sw"):
        assert 1.0 < m[f"ppl_ratio.{lang}"] < 20.0, "pruning hurts, but the model still works"
    dense = MlflowClient(uri).get_run(run.data.tags["langprune.dense_run"]).data.metrics
    # the dense model is the real multilingual Gemma: bits per byte near the measured figures
    assert dense["bpb.en"] == pytest.approx(1.02, rel=0.15)
    assert dense["bpb.sw"] == pytest.approx(1.85, rel=0.15)
