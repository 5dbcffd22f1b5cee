"""Faults injected for real into the pipeline on a tiny model: SIGKILL, SIGINT and SIGTERM in the
middle of pruning, a tracking server that goes away for 20 s, a search worker killed mid-trial,
a full disk and an unwritable artifact location.

The victims are real ``python -m pipeline`` processes (through :mod:`tests.fault_runner`, which
only adds a pause point so the fault lands at a known moment). We run as root in CI, where
``chmod`` cannot make a folder unwritable: the unwritable artifact location is a regular file
where its folder should be, and a full disk is ENOSPC raised from the write calls in-process
(the one simulated fault here).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from jobs import search as S
from jobs.cli import main as cli_main
from jobs.main import run_main
from pipeline.config import Config
from pipeline.errors import LangpruneError
from pipeline.masks import load_masks
from pipeline.paths import REPO_ROOT
from tests.servers import wait_http
from tracking import optuna_mlflow as OM
from tracking import params as P
from tracking import reliability as REL
from tracking import runs as R

optuna.logging.set_verbosity(optuna.logging.WARNING)

PAUSE_TIMEOUT_S = 600  # a guard against a hung child (generous: CI machines are shared)


def main_overrides(model_dir: Path, tmp_path: Path, **kw: str) -> dict[str, str]:
    base = {"model": str(model_dir), "n_samples": "4", "seq_len": "32", "eval_langs": "en",
            "eval_tokens": "64", "tasks": "", "device": "cpu", "experiment": "t",
            "output_dir": str(tmp_path / "out")}
    return {**base, **kw}


def search_overrides(model_dir: Path, tmp_path: Path, **kw: str) -> dict[str, str]:
    base = {"model": str(model_dir), "n_samples": "4", "seq_len": "32", "eval_tokens": "64",
            "search_eval_tokens": "64", "tasks": "", "device": "cpu", "experiment": "t",
            "languages": "de,sw", "target_lang": "sw", "verdict_sets": "2", "n_trials": "3",
            "storage": f"sqlite:///{tmp_path / 'optuna.db'}", "output_dir": str(tmp_path / "out")}
    return {**base, **kw}


class Victim:
    """A ``python -m pipeline`` process that stops at a pause point (see tests/fault_runner)."""

    def __init__(self, tmp_path: Path, pause: str, command: str, overrides: dict[str, str],
                 go: bool = False, env: dict[str, str] | None = None) -> None:
        self.marker = tmp_path / f"paused-{pause.replace(':', '-')}"
        self.report = tmp_path / f"report-{pause.replace(':', '-')}.json"
        self.go = tmp_path / "go" if go else None
        self.log = tmp_path / f"victim-{pause.replace(':', '-')}.log"
        full_env = {**(env if env is not None else os.environ), "PYTHONPATH": str(REPO_ROOT),
                    "FAULT_PAUSE": pause, "FAULT_MARKER": str(self.marker),
                    "FAULT_REPORT": str(self.report), "TOKENIZERS_PARALLELISM": "false"}
        if self.go is not None:
            full_env["FAULT_GO"] = str(self.go)
        args = [f"{k}={v}" for k, v in overrides.items()]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fault_runner", command, *args], cwd=tmp_path,
            env=full_env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)

    def wait_paused(self) -> None:
        deadline = time.monotonic() + PAUSE_TIMEOUT_S
        while not self.marker.exists():
            if self.proc.poll() is not None:
                pytest.fail(f"victim exited ({self.proc.returncode}) before its pause point:\n"
                            f"{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"victim never reached its pause point:\n{self.output()[-3000:]}")
            time.sleep(0.2)

    def signal(self, signum: int) -> int:
        os.kill(self.proc.pid, signum)
        return self.proc.wait(timeout=PAUSE_TIMEOUT_S)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def spawn():
    """Start :class:`Victim` processes; any still alive at the end (a failed test) is killed."""
    started: list[Victim] = []

    def start(*args, **kwargs) -> Victim:
        started.append(Victim(*args, **kwargs))
        return started[-1]

    yield start
    for victim in started:
        if victim.proc.poll() is None:
            victim.proc.kill()
            victim.proc.wait(30)


def experiment_id(client) -> str:
    return client.get_experiment_by_name("t").experiment_id


def pruned_runs(client) -> list:
    return client.search_runs([experiment_id(client)], f"tags.`{P.TAG_KIND}` = 'pruned'")


def mask_files(folder: Path) -> list[Path]:
    """Every mask file under ``folder``, final or temporary."""
    return [p for p in folder.rglob("*") if p.is_file() and "masks" in p.name]


# ---- 1. SIGKILL ------------------------------------------------------------------------------


@pytest.mark.parametrize("pause", [
    "hook:1",  # layer 0 pruned in place, layer 1's statistics being gathered
    "save",  # pruning done, half of the mask file written under its temporary name
])
def test_sigkill_during_pruning_leaves_nothing_complete_and_a_rerun_is_reused(
        store, tiny_model_dir, tmp_path, spawn, pause):
    overrides = main_overrides(tiny_model_dir, tmp_path)
    victim = spawn(tmp_path, pause, "main", overrides)
    victim.wait_paused()
    [run] = pruned_runs(store)
    assert run.info.status == "RUNNING" and run.data.params["method"] == "wanda"
    assert victim.signal(signal.SIGKILL) == -signal.SIGKILL

    killed = store.get_run(run.info.run_id)
    assert killed.info.status == "RUNNING"  # nobody could end it ...
    assert killed.data.tags[P.TAG_STATE] == "running"
    assert store.list_artifacts(killed.info.run_id, "masks") == []
    left = mask_files(tmp_path / "out")  # never a file under the final name
    assert [p.name.endswith(".tmp") for p in left] == ([True] if pause == "save" else [])
    if left:
        with pytest.raises(LangpruneError):
            load_masks(left[0])  # and the partial one is refused, not half-used

    cfg = Config.from_overrides(overrides)
    rerun = run_main(cfg)  # ... until the next start reaps it
    # ... and removes the killed writer's partial file; only the rerun's final file is left
    assert [p.name for p in mask_files(tmp_path / "out")] == ["masks.safetensors"]
    assert mask_files(tmp_path / "out")[0].parent.name == rerun.run_id
    killed = store.get_run(run.info.run_id)
    assert killed.info.status == "FAILED" and killed.data.tags[P.TAG_STATE] == "failed"
    assert "process died" in killed.data.tags["langprune.error"]
    assert not rerun.reused and rerun.run_id != killed.info.run_id
    done = store.get_run(rerun.run_id)
    assert done.info.status == "FINISHED" and done.data.tags[P.TAG_STATE] == "complete"

    again = run_main(cfg)
    assert again.reused and again.run_id == rerun.run_id
    _, _, code = P.code_version()
    assert R.find_complete_run(experiment_id(store), cfg.config_hash(), code) == rerun.run_id


# ---- 2. SIGINT / SIGTERM ---------------------------------------------------------------------


@pytest.mark.parametrize(("signum", "pause", "status"), [
    (signal.SIGINT, "hook:1", 130),  # forward pre-hooks registered, mid-forward
    (signal.SIGTERM, "save", 143),  # half of the mask file on disk under its temporary name
])
def test_sigint_sigterm_stop_cleanly(store, tiny_model_dir, tmp_path, spawn, signum, pause,
                                     status):
    victim = spawn(tmp_path, pause, "main", main_overrides(tiny_model_dir, tmp_path))
    victim.wait_paused()
    if pause == "save":
        assert [p.name.endswith(".tmp") for p in mask_files(tmp_path / "out")] == [True]
    assert victim.signal(signum) == status, victim.output()[-3000:]

    report = json.loads(victim.report.read_text())
    assert report["models"] == 1
    assert report["hooks"] == 0 and report["forward_overrides"] == 0, report
    [run] = pruned_runs(store)
    assert run.info.status == "KILLED", victim.output()[-3000:]
    assert run.data.tags[P.TAG_STATE] == "killed"
    assert run.data.tags["langprune.error"] == "interrupted by signal"
    assert mask_files(tmp_path / "out") == []  # neither a final nor a temporary mask file
    assert store.list_artifacts(run.info.run_id, "masks") == []
    assert "Traceback" not in victim.output()


# ---- 3. tracking server outage ----------------------------------------------------------------


def _listening_addresses(pid: int) -> set[str]:
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return {c.laddr.ip for p in procs for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def _server_down(url: str) -> bool:
    try:
        urllib.request.urlopen(url + "/health", timeout=2)
    except OSError:
        return True
    return False


@pytest.mark.e2e
def test_tracking_server_outage_loses_nothing(mlflow_server, tiny_model_dir, tmp_path,
                                              monkeypatch, spawn):
    from mlflow.tracking import MlflowClient

    env = {k: v for k, v in os.environ.items()
           if k not in REL.HTTP_RETRY_DEFAULTS and not k.startswith("MLFLOW_RUN")}
    env.update(MLFLOW_TRACKING_URI=mlflow_server.url, LANGPRUNE_CACHE=str(tmp_path / "cache"))
    overrides = main_overrides(tiny_model_dir, tmp_path)
    assert _listening_addresses(mlflow_server.proc.pid) == {"127.0.0.1"}  # loopback only

    victim = spawn(tmp_path, "hook:1", "main", overrides, go=True, env=env)
    victim.wait_paused()
    client = MlflowClient(mlflow_server.url)
    [run] = pruned_runs(client)
    run_id = run.info.run_id

    os.killpg(mlflow_server.proc.pid, signal.SIGKILL)  # the server dies, mid-run
    mlflow_server.proc.wait(30)
    mlflow_server.proc = None
    assert _server_down(mlflow_server.url)
    victim.go.touch()  # pruning finishes; logging its results meets a dead server
    time.sleep(20)  # the outage itself (a fault's duration, not a check)
    assert victim.proc.poll() is None, victim.output()[-3000:]  # still waiting, not failed
    try:
        mlflow_server.start()  # same port, same database and artifact folder
    except TimeoutError:  # a slow start on a loaded machine; the client retries for ~8 min
        wait_http(mlflow_server.url + "/health", 240)
    assert victim.proc.wait(timeout=600) == 0, victim.output()[-3000:]
    assert "Retrying" in victim.output()  # urllib3's retry warnings: the outage was met

    cfg = Config.from_overrides(overrides)
    done = client.get_run(run_id)
    assert done.info.status == "FINISHED" and done.data.tags[P.TAG_STATE] == "complete"
    assert done.data.tags[REL.TAG_HTTP_RETRIES] == (
        "max_retries=10,backoff_factor=1,backoff_jitter=1.0,timeout=120")
    params = dict(done.data.params)
    assert params.pop("ppl_definition")
    assert params == P.to_mlflow_params(cfg)
    expected_metrics = {"sparsity.actual", "sparsity.preexisting_zeros", "time.prune_s",
                        "prune.damp_retries", "calib.tokens", "sparsity.layer", "ppl.en",
                        "bpb.en", "ppl_ratio.en", "time.eval_s", "memory.peak_rss_mb"}
    assert expected_metrics <= set(done.data.metrics)
    steps = sorted(m.step for m in client.get_metric_history(run_id, "sparsity.layer"))
    assert steps == [0, 1]
    assert len(done.inputs.dataset_inputs) == 2  # evaluation and calibration data sets
    artifacts = _all_artifacts(client, run_id)
    assert artifacts == {"config.yaml", "calibration/manifest.json", "masks/masks.safetensors",
                         "tables/sparsity_modules.csv", "tables/sparsity_layers.csv",
                         "eval/perplexity.json", "eval/ppl_windows.parquet",  # per window
                         "plots/ppl_vs_dense.png"}
    local = client.download_artifacts(run_id, "masks/masks.safetensors", str(tmp_path))
    assert len(load_masks(local)) == 14  # checksum verified: 2 layers x 7 linears
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    assert R.find_complete_run(experiment_id(client), cfg.config_hash(),
                               done.data.tags[P.TAG_CODE]) == run_id


def _all_artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for info in client.list_artifacts(run_id, path):
        out |= _all_artifacts(client, run_id, info.path) if info.is_dir else {info.path}
    return out


# ---- 4. search worker killed mid-trial --------------------------------------------------------


def test_search_worker_killed_mid_trial(store, tiny_model_dir, tmp_path, spawn):
    overrides = search_overrides(tiny_model_dir, tmp_path)
    cfg = Config.from_overrides(overrides)
    victim = spawn(tmp_path, "trial:1", "search", overrides)
    victim.wait_paused()
    study = optuna.load_study(study_name=S.default_study_name(cfg), storage=cfg.search.storage)
    states = [t.state for t in study.trials]
    assert states[:2] == [TrialState.COMPLETE, TrialState.RUNNING]
    assert set(states[2:]) <= {TrialState.WAITING}  # enqueued single-language blends
    trial0 = study.trials[0]
    assert victim.signal(signal.SIGKILL) == -signal.SIGKILL
    assert study.trials[1].state == TrialState.RUNNING  # nobody could fail it

    result = S.run_search(cfg, progress=False)  # the worker is started again

    study = optuna.load_study(study_name=S.default_study_name(cfg), storage=cfg.search.storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL,
                                                TrialState.COMPLETE]
    assert result.trials_run == 1  # the failed trial counts towards n_trials
    assert "WorkerDied" in study.trials[1].user_attrs[OM.FAIL_ATTR]
    after0 = study.trials[0]  # the trial finished before the kill is untouched
    assert (after0.params, after0.value, after0.user_attrs, after0.datetime_complete) == (
        trial0.params, trial0.value, trial0.user_attrs, trial0.datetime_complete)
    runs = {int(r.data.tags[OM.TAG_TRIAL]): r for r in store.search_runs(
        [experiment_id(store)], f"tags.`{P.TAG_KIND}` = 'trial'")}
    assert sorted(runs) == [0, 1, 2]
    assert runs[0].info.status == "FINISHED" and runs[0].data.metrics["objective"] == trial0.value
    assert runs[1].info.status == "FAILED" and runs[1].data.tags[OM.TAG_OPTUNA_STATE] == "FAIL"
    assert runs[2].info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in runs.values()} == {result.parent_run_id}
    parent = store.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags[P.TAG_STATE] == "complete"
    assert result.verdict is not None  # the study is complete: no trial left RUNNING


# ---- 5. full disk, unwritable artifact location ------------------------------------------------


def _cli(args: list[str], monkeypatch) -> int:
    """``python -m pipeline`` in-process (keeps the test's signal handler and environment)."""
    for key, value in REL.HTTP_RETRY_DEFAULTS.items():
        monkeypatch.setenv(key, os.environ.get(key, value))
    handler = signal.getsignal(signal.SIGTERM)
    try:
        return cli_main(args)
    finally:
        signal.signal(signal.SIGTERM, handler)


def test_unwritable_artifact_location_is_one_clear_error(store, tiny_model_dir, tmp_path,
                                                         monkeypatch, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the artifact folder should be")
    store.create_experiment("t", artifact_location=str(blocker / "artifacts"))
    overrides = main_overrides(tiny_model_dir, tmp_path)
    rc = _cli(["main", *[f"{k}={v}" for k, v in overrides.items()]], monkeypatch)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and err.startswith("error: cannot store artifact config.yaml")
    [run] = pruned_runs(store)
    assert run.info.status == "FAILED" and run.data.tags[P.TAG_STATE] == "failed"
    assert run.data.tags["langprune.error"] in err
    assert blocker.read_text() == "a file where the artifact folder should be"
    dense = store.search_runs([experiment_id(store)], f"tags.`{P.TAG_KIND}` = 'dense'")
    assert dense == []  # it stopped before the model was loaded


def _enospc(path: object) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_disk_full_while_writing_masks(store, tiny_model_dir, tmp_path, monkeypatch):
    from pipeline import masks

    real_save = masks.save_file

    def full_disk(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 3])  # what fitted before the disk filled
        raise _enospc(path)

    monkeypatch.setattr(masks, "save_file", full_disk)
    cfg = Config.from_overrides(main_overrides(tiny_model_dir, tmp_path))
    with pytest.raises(LangpruneError, match="cannot write masks to .*No space left on device"):
        run_main(cfg)
    [run] = pruned_runs(store)
    assert run.info.status == "FAILED"
    assert "No space left on device" in run.data.tags["langprune.error"]
    assert mask_files(tmp_path / "out") == []  # the partial file is gone
    assert store.list_artifacts(run.info.run_id, "masks") == []

    monkeypatch.setattr(masks, "save_file", real_save)  # space freed: the same config works
    again = run_main(cfg)
    assert not again.reused and store.get_run(again.run_id).info.status == "FINISHED"


def test_disk_full_in_the_artifact_store(store, tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    from mlflow.store.artifact import local_artifact_repo

    real_copy = shutil.copyfileobj

    def full_disk(src, dst, length=0):
        if getattr(src, "name", "").endswith("masks.safetensors"):
            dst.write(src.read(100))
            raise _enospc(getattr(dst, "name", "artifact"))
        return real_copy(src, dst, length)

    monkeypatch.setattr(local_artifact_repo.shutil, "copyfileobj", full_disk)
    cfg = Config.from_overrides(main_overrides(tiny_model_dir, tmp_path))
    with pytest.raises(LangpruneError,
                       match="cannot store artifact masks/masks.safetensors .*No space left"):
        run_main(cfg)
    [run] = pruned_runs(store)
    assert run.info.status == "FAILED" and run.data.tags[P.TAG_STATE] == "failed"
    assert store.list_artifacts(run.info.run_id, "masks") == []  # no partial artifact
    folder = Path(run.info.artifact_uri.removeprefix("file://"))
    assert not [p for p in folder.rglob("*") if p.is_file() and "masks" in p.name]
