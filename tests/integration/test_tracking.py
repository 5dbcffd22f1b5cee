"""Tracking against a real SQLite store in tmp_path: params, reuse, failure states, reaping."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from pipeline.config import Config
from pipeline.errors import LangpruneError
from pipeline.jobs import run_main
from tracking import params as P
from tracking import runs as R


def small_cfg(model_dir, **kw) -> Config:
    base = {"model": str(model_dir), "n_samples": "4", "seq_len": "32", "eval_langs": "en,sw",
            "eval_tokens": "128", "tasks": "", "device": "cpu", "experiment": "t"}
    return Config.from_overrides({**base, **kw})


def test_params_are_the_canonical_config_and_reuse_works(store, tiny_model_dir, capsys):
    cfg = small_cfg(tiny_model_dir, calib_lang="sw", method="sparsegpt")
    first = run_main(cfg)
    assert not first.reused
    run = store.get_run(first.run_id)
    logged = {k: v for k, v in run.data.params.items() if k != "ppl_definition"}
    assert logged == P.to_mlflow_params(cfg)
    assert run.data.tags[P.TAG_STATE] == "complete" and run.info.status == "FINISHED"
    assert run.data.tags[P.TAG_HASH] == cfg.config_hash()
    assert run.data.metrics["ppl_ratio.sw"] > 0
    losses = store.get_metric_history(first.run_id, "sparsegpt_loss.layer")
    assert [h.step for h in sorted(losses, key=lambda h: h.step)] == [0, 1]

    again = run_main(cfg)
    assert again.reused and again.run_id == first.run_id
    assert first.run_id in capsys.readouterr().out
    forced = run_main(cfg.replace(force="true"))
    assert not forced.reused and forced.run_id != first.run_id
    # one dense baseline for all of them
    dense = store.search_runs([run.info.experiment_id], f"tags.`{P.TAG_KIND}` = 'dense'")
    assert len(dense) == 1


def test_a_failing_run_is_marked_failed_and_never_reused(store, tiny_model_dir, monkeypatch):
    import pipeline.stages as stages

    def boom(*a, **k):
        raise RuntimeError("simulated crash during pruning")

    monkeypatch.setattr(stages, "prune", boom)
    cfg = small_cfg(tiny_model_dir)
    with pytest.raises(RuntimeError):
        run_main(cfg)
    exp = store.get_experiment_by_name("t")
    failed = store.search_runs([exp.experiment_id], f"tags.`{P.TAG_KIND}` = 'pruned'")
    assert [r.info.status for r in failed] == ["FAILED"]
    assert "simulated crash" in failed[0].data.tags["langprune.error"]
    _, _, code = P.code_version()
    assert R.find_complete_run(exp.experiment_id, cfg.config_hash(), code) is None


def test_unwritable_output_dir_is_a_clear_error(store, tiny_model_dir, tmp_path):
    target = tmp_path / "file-not-dir"
    target.write_text("x")
    with pytest.raises(LangpruneError, match="not writable"):
        run_main(small_cfg(tiny_model_dir, output_dir=str(target / "sub")))
    exps = [e.experiment_id for e in store.search_experiments()]
    assert store.search_runs(exps) == [], "no run may be left behind by bad input"


def test_dead_runs_are_reaped(store):
    exp = R.experiment_id("t")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    rid = R.new_run(exp, "victim", {P.TAG_PID: str(proc.pid), P.TAG_HOST: __import__(
        "socket").gethostname(), P.TAG_STATE: "running"})
    assert R.reap_stale_runs(exp) == []  # still alive
    proc.kill()
    proc.wait()
    assert R.reap_stale_runs(exp) == [rid]
    run = store.get_run(rid)
    assert run.info.status == "FAILED" and run.data.tags[P.TAG_STATE] == "failed"
    # an `mlflow run` whose environment set-up died: no pid tag, old enough
    orphan = R.new_run(exp, "env-setup-died", {})
    assert orphan not in R.reap_stale_runs(exp)
    assert orphan in R.reap_stale_runs(exp, now_s=time.time() + R.STALE_UNSTARTED_S + 60)
