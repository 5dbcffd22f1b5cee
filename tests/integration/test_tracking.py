"""Tracking against a real SQLite store in tmp_path: params, reuse, failure states, reaping."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from jobs.main import run_main
from pipeline.config import Config
from pipeline.errors import LangpruneError
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
    assert run.data.tags[P.TAG_SPARSEGPT_FACTOR] == "products"  # CPU: pipeline/pruners/linalg
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


def test_ppl_ratio_carries_a_paired_interval_with_a_fresh_or_stored_dense(store, tiny_model_dir):
    """The first run evaluates the dense baseline itself; the second reads its windows back."""
    first = run_main(small_cfg(tiny_model_dir, calib_lang="sw", eval_seq_len="32"))
    second = run_main(small_cfg(tiny_model_dir, calib_lang="en", eval_seq_len="32"))
    for result in (first, second):
        m = store.get_run(result.run_id).data.metrics
        for lang in ("en", "sw"):
            low, high = m[f"ppl_ratio.{lang}.ci95_low"], m[f"ppl_ratio.{lang}.ci95_high"]
            assert low <= m[f"ppl_ratio.{lang}"] <= high and low < high


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



@pytest.fixture
def lose_the_race(store, monkeypatch):
    """Make the next params insert of MLflow's SQL store lose a race with another worker.

    The other worker's params are written straight into the database after the store has read
    the run's existing params and before it inserts its own, the window two search workers
    logging to one parent run share. The store's insert then really fails on the unique key.
    """
    import sqlite3

    from mlflow.store.tracking import sqlalchemy_store as S

    db = os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")
    real = S.SqlParam
    pending: list[tuple[str, dict[str, str]]] = []
    refused: list[str] = []

    def param_after_the_other_worker(**kw):
        while pending:
            run_id, other = pending.pop()
            with sqlite3.connect(db) as con:
                con.executemany("INSERT INTO params (key, value, run_uuid) VALUES (?, ?, ?)",
                                [(k, v, run_id) for k, v in other.items()])
            con.close()
        return real(**kw)

    monkeypatch.setattr(S, "SqlParam", param_after_the_other_worker)
    real_log_batch = store.__class__.log_batch

    def log_batch(self, run_id, *a, **kw):
        try:
            return real_log_batch(self, run_id, *a, **kw)
        except Exception as e:
            refused.append(str(e))
            raise

    monkeypatch.setattr(store.__class__, "log_batch", log_batch)
    return lambda run_id, other: pending.append((run_id, other)), refused


def test_params_logged_concurrently_by_another_worker_are_not_an_error(store, lose_the_race):
    race, refused = lose_the_race
    exp = store.create_experiment("race")
    run_id = store.create_run(exp).info.run_id
    params = {"study": "s1", "method": "wanda", "sparsity": "0.5"}
    race(run_id, {"study": "s1", "method": "wanda"})
    R.TrackedRun(run_id).log_params(params)
    assert len(refused) == 1 and R.is_concurrent_insert(Exception(refused[0])), refused
    assert store.get_run(run_id).data.params == params


def test_a_concurrent_worker_with_other_param_values_is_still_refused(store, lose_the_race):
    race, refused = lose_the_race
    exp = store.create_experiment("race2")
    run_id = store.create_run(exp).info.run_id
    race(run_id, {"method": "sparsegpt"})
    with pytest.raises(LangpruneError, match="param method was logged as 'sparsegpt'"):
        R.TrackedRun(run_id).log_params({"method": "wanda", "sparsity": "0.5"})
    assert len(refused) == 1
