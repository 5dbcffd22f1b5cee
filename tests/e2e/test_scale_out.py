"""Scale-out on an existing engine: PostgreSQL as the backend store of a real ``mlflow server``
and as the Optuna storage; four search workers started together on one study.

Needs Debian's PostgreSQL server binaries (``.ci/run`` installs them; the session fixture
``postgres`` starts a throwaway cluster on 127.0.0.1 and stops it afterwards).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections import Counter

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pipeline.paths import REPO_ROOT
from tests.servers import MlflowServer
from tracking import optuna_mlflow as OM
from tracking import params as P

pytestmark = pytest.mark.e2e

WORKERS = 4
N_TRIALS = 10
STUDY = "scale-out"
WORKER_GUARD_S = 900  # not a timing assertion: only stops a hung worker


@pytest.fixture
def pg_mlflow_server(postgres, tmp_path):
    """``mlflow server`` on 127.0.0.1 with a fresh PostgreSQL database as its backend store."""
    db = postgres.create_database(f"mlflow_{uuid.uuid4().hex[:12]}")
    server = MlflowServer(tmp_path / "server", backend_store_uri=db)
    server.root.mkdir()
    server.start(timeout=300)  # a fresh PostgreSQL store runs MLflow's migrations first
    yield server
    server.stop()


def test_four_workers_on_postgres_record_every_trial_once_under_one_parent(
        postgres, pg_mlflow_server, tiny_model_dir, tmp_path):
    storage = postgres.create_database(f"optuna_{uuid.uuid4().hex[:12]}")
    client = MlflowClient(pg_mlflow_server.url)
    client.create_experiment("t")
    args = {"model": str(tiny_model_dir), "target_lang": "sw", "languages": "de,en,sw",
            "mode": "fast", "n_trials": str(N_TRIALS), "storage": storage, "study_name": STUDY,
            "n_samples": "4", "seq_len": "32", "eval_tokens": "64", "search_eval_tokens": "64",
            "tasks": "", "device": "cpu", "experiment": "t", "verdict_sets": "2"}
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "LANGPRUNE_LOG_LEVEL": "WARNING",
           "MLFLOW_TRACKING_URI": pg_mlflow_server.url, "LANGPRUNE_CACHE": str(tmp_path / "c"),
           "MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "pipeline", "search", *(f"{k}={v}" for k, v in args.items())]
    logs = [tmp_path / f"worker-{i}.log" for i in range(WORKERS)]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log.open("w"),
                              stderr=subprocess.STDOUT) for log in logs]
    for p in procs:  # a guard against a hang, generous for a loaded CI machine
        try:
            p.wait(timeout=WORKER_GUARD_S)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    outputs = [log.read_text()[-3000:] for log in logs]
    assert [p.returncode for p in procs] == [0] * WORKERS, outputs

    # Optuna: exactly the requested trials, numbered 0..n-1, each complete, trial 0 target-only
    study = optuna.load_study(study_name=STUDY, storage=storage)
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(N_TRIALS))
    assert all(t.state == TrialState.COMPLETE for t in trials), [t.state for t in trials]
    assert [t.user_attrs.get("role") for t in trials].count("target-only") == 1
    workers = Counter(t.user_attrs["worker"] for t in trials)
    assert len(workers) >= 2, workers  # the workers really shared the study

    # MLflow (PostgreSQL behind the server): one run per trial, all under one parent
    exp_id = client.get_experiment_by_name("t").experiment_id
    runs = client.search_runs([exp_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get(P.TAG_KIND) == "search"]
    assert len(parents) == 1, [r.info.run_id for r in parents]
    parent = parents[0]
    assert study.user_attrs[OM.PARENT_ATTR] == parent.info.run_id
    assert [r.info.run_id for r in parents if r.data.tags.get(OM.TAG_STUDY) == STUDY] == [
        parent.info.run_id]
    trial_runs = [r for r in runs if r.data.tags.get(P.TAG_KIND) == "trial"]
    assert sorted(int(r.data.tags[OM.TAG_TRIAL]) for r in trial_runs) == list(range(N_TRIALS))
    assert {t.user_attrs[OM.RUN_ID_ATTR] for t in trials} == {r.info.run_id for r in trial_runs}
    assert all(r.info.status == "FINISHED" for r in trial_runs)
    # every run of the search hangs under the parent; only the shared dense baseline (reused
    # by every pruned run of this model, referenced by tag) stands on its own
    for r in runs:
        if r.info.run_id == parent.info.run_id or r.data.tags.get(P.TAG_KIND) == "dense":
            continue
        assert r.data.tags.get("mlflow.parentRunId") == parent.info.run_id, r.data.tags
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[P.TAG_STATE] == "complete"
    assert parent.data.tags["langprune.verdict"] in ("yes", "no", "inconclusive")
