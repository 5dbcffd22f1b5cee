"""The command line's own behaviour (issue 16): per-command help, the ``check`` command, the
run ``mlflow run`` creates when a command fails early, the experiment under ``mlflow run``,
run names per evaluation budget, artifacts of a SQLite store, small refusals and texts."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from jobs import cli
from pipeline.config import SECTIONS, Config
from pipeline.errors import LangpruneError
from pipeline.paths import REPO_ROOT
from tests.servers import free_port
from tracking import params as P
from tracking import runs as R


@pytest.fixture
def restore_process():
    """cli.main sets environment defaults and a SIGTERM handler: undo both."""
    saved_env, saved_handler = dict(os.environ), signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, saved_handler)
    os.environ.clear()
    os.environ.update(saved_env)


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        cli._parser().parse_args([command, "--help"])
    return capsys.readouterr().out


# ---- --help ---------------------------------------------------------------------------------


def test_main_help_lists_its_keys_with_default_and_comment(capsys):
    out = _help("main", capsys)
    assert re.search(r"^  calib_lang=en +the blend \{calib_lang: 1\.0\} unless calib_blend is set$",
                     out, re.M), out
    assert re.search(r"^  sparsity=0\.5 +fraction of weights pruned per matrix", out, re.M)
    assert "sweep_langs" not in out and "target_lang" not in out and "lsar_pooling" not in out
    assert "keys: " not in out  # the old one-line dump of all keys is gone


def test_each_command_help_shows_only_its_keys_and_its_defaults(capsys):
    sweep = _help("sweep", capsys)
    assert "sweep_langs=ar,de,en,es,ru,sw,zh" in sweep
    assert re.search(r"^  eval_tokens=1024 ", sweep, re.M)  # COMMAND_DEFAULTS of sweep
    assert re.search(r"^  limit=50 ", sweep, re.M)  # the sweep budget (COMMAND_DEFAULTS)
    dense = _help("dense", capsys)
    assert "eval_tokens=2048" in dense and "calib_lang" not in dense and "method=" not in dense
    report = _help("report", capsys)
    assert "report_dir=reports" in report and "calib_lang" not in report
    search = _help("search", capsys)
    assert "target_lang=sw" in search and "calib_source=ntrex" in search
    assert "sweep_langs" not in search


def test_every_commented_field_has_its_comment_in_the_help():
    """The comments are read from the pipeline/config/ package; none goes missing."""
    package = REPO_ROOT / "pipeline" / "config"
    source = "".join(p.read_text() for p in sorted(package.glob("*.py")))
    for typ in SECTIONS.values():
        comments = cli.field_comments(typ)
        for comment in comments.values():
            assert f"# {comment}" in source
        assert set(comments) <= {f.name for f in dataclasses.fields(typ)}
    assert len([k for k, _, c in cli.command_keys("config") if c]) >= 45
    assert len(cli.command_keys("config")) == len(Config.keys())


# ---- check ----------------------------------------------------------------------------------


def test_check_against_a_closed_port_is_one_line_and_exit_2(restore_process):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MLFLOW_TRACKING_URI":
           f"http://127.0.0.1:{port}", "LANGPRUNE_LOG_LEVEL": "WARNING"}
    for k in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        env.pop(k, None)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipeline", "check"], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith(
        f"error: tracking server http://127.0.0.1:{port} is not reachable"), proc.stderr
    assert "Connection refused" in lines[0]
    # MLflow's own retries would take ~250 s; importing mlflow on a loaded machine is most
    # of what is left.
    assert took < 60, took


def test_check_in_process_takes_seconds(restore_process, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    t0 = time.monotonic()
    try:
        rc = cli.main(["check"])
    finally:
        mlflow.set_tracking_uri(None)
    assert rc == 2 and time.monotonic() - t0 < 10
    assert capsys.readouterr().err.count("error:") == 1


def test_check_ok_creates_the_experiment_next_to_the_database(tmp_path, monkeypatch,
                                                              restore_process, capsys):
    db_dir, work = tmp_path / "db", tmp_path / "work"
    db_dir.mkdir()
    work.mkdir()
    uri = f"sqlite:///{db_dir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for k in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(work)
    try:
        assert cli.main(["check"]) == 0
    finally:
        mlflow.set_tracking_uri(None)
    out = capsys.readouterr().out
    assert out.startswith(f"ok: tracking store {uri} answers; experiment 'langprune'")
    exp = MlflowClient(uri).get_experiment_by_name("langprune")
    assert exp.artifact_location == (db_dir / "mlruns" / "langprune").as_uri()


# ---- artifacts of a SQLite store live next to it ----------------------------------------------


def test_sqlite_artifacts_land_next_to_the_database_not_in_the_working_folder(
        tmp_path, monkeypatch, _empty_mlflow_db):
    import shutil

    db_dir, work = tmp_path / "elsewhere", tmp_path / "repo"
    db_dir.mkdir()
    work.mkdir()
    shutil.copyfile(_empty_mlflow_db, db_dir / "mlflow.db")
    uri = f"sqlite:///{db_dir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.chdir(work)
    mlflow.set_tracking_uri(uri)
    try:
        exp = R.experiment_id("a b/c")
        run = R.TrackedRun(R.new_run(exp, "r", {}))
        run.log_text("hello", "notes/x.txt")
    finally:
        mlflow.set_tracking_uri(None)
    assert list(db_dir.glob("mlruns/a_b_c/*/artifacts/notes/x.txt"))
    assert not (work / "mlruns").exists()


def test_default_artifact_location_only_for_sqlite_files(monkeypatch):
    monkeypatch.delenv("_MLFLOW_SERVER_ARTIFACT_ROOT", raising=False)
    assert R.default_artifact_location("e", "sqlite:////srv/x/mlflow.db") == \
        "file:///srv/x/mlruns/e"
    assert R.default_artifact_location("e", "http://127.0.0.1:5000") is None
    assert R.default_artifact_location("e", "postgresql+psycopg2://u@h/db") is None
    assert R.default_artifact_location("e", "sqlite://") is None
    monkeypatch.setenv("_MLFLOW_SERVER_ARTIFACT_ROOT", "/srv/artifacts")
    assert R.default_artifact_location("e", "sqlite:////srv/x/mlflow.db") is None


# ---- the run `mlflow run` created, when a command fails early -------------------------------


def _mlflow_run_run(client: MlflowClient, experiment: str = "0") -> str:
    """A run as `mlflow run` creates it: RUNNING, a random name, before our code starts."""
    return client.create_run(experiment, run_name="handsome-owl-123").info.run_id


def test_early_error_names_and_fails_the_mlflow_run_run(store, monkeypatch, restore_process,
                                                        capsys):
    run_id = _mlflow_run_run(store)
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    assert cli.main(["main", "sparsty=0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "'sparsty'" in err  # the original error, unmasked
    run = store.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.info.run_name == "failed-main"
    assert run.data.tags[P.TAG_STATE] == "failed"
    assert "unknown config key 'sparsty'" in run.data.tags[P.TAG_ERROR]
    assert run.data.tags[P.TAG_ENTRY] == "main"


def test_early_error_with_a_dead_store_still_reports_the_error(monkeypatch, restore_process,
                                                               capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123456789abcdef0123456789abcdef")
    t0 = time.monotonic()
    try:
        assert cli.main(["dense", "limit=-1"]) == 2
    finally:
        mlflow.set_tracking_uri(None)
    assert time.monotonic() - t0 < 30
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "limit must be >= 0" in err


def test_a_run_taken_over_is_left_to_the_job(store, monkeypatch):
    """Once the job attached to the run (MLFLOW_RUN_ID popped), the CLI leaves it alone."""
    run_id = _mlflow_run_run(store)
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    R.attach_or_create("0", "wanda-0.5-zh-set0", {})
    assert R.fail_env_run("main", "boom") is False
    assert store.get_run(run_id).info.status == "RUNNING"


# ---- one experiment ---------------------------------------------------------------------------


def test_experiment_follows_the_mlflow_run_run(store, monkeypatch):
    cfg = Config()
    assert cfg.run.experiment == "langprune"
    run_id = _mlflow_run_run(store)  # `mlflow run` without --experiment-name: Default
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    assert cli.adopt_experiment(cfg, set()).run.experiment == "Default"
    with pytest.raises(LangpruneError, match="--experiment-name langprune"):
        cli.adopt_experiment(cfg, {"experiment"})
    exp = store.create_experiment("langprune")
    monkeypatch.setenv("MLFLOW_RUN_ID", _mlflow_run_run(store, exp))
    assert cli.adopt_experiment(cfg, {"experiment"}) == cfg  # agrees: nothing to do


def test_experiment_name_variable_is_the_default(monkeypatch):
    for k in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    cfg = Config()
    assert cli.adopt_experiment(cfg, set()).run.experiment == "mine"
    explicit = cfg.replace(experiment="other")
    assert cli.adopt_experiment(explicit, {"experiment"}).run.experiment == "other"


def test_logged_experiment_param_matches_the_run_under_mlflow_run(store, monkeypatch,
                                                                  restore_process, capsys):
    """Through the CLI: `check` under an `mlflow run` run in Default names Default."""
    monkeypatch.setenv("MLFLOW_RUN_ID", _mlflow_run_run(store))
    assert cli.main(["check"]) == 0
    assert "experiment 'Default' (id 0)" in capsys.readouterr().out


# ---- run names and the budget tag -------------------------------------------------------------


def test_dense_run_names_tell_evaluation_budgets_apart():
    cfg = Config()
    assert P.run_name(cfg, "dense") == "dense-gemma-3-270m"
    small = cfg.replace(eval_tokens="1024", limit="4")
    assert P.run_name(small, "dense") == "dense-gemma-3-270m-t1024-l4"
    assert P.run_name(cfg.replace(limit="2"), "dense") == "dense-gemma-3-270m-l2"
    assert P.run_name(small) == "wanda-0.5-en-set0"  # pruned names stay as documented
    assert P.run_tags(small, "pruned", "cpu", "main")[P.TAG_BUDGET] == "t1024-l4"
    assert P.run_tags(cfg, "dense", "cpu", "dense")[P.TAG_BUDGET] == "t2048-l50"  # defaults


# ---- small ones -------------------------------------------------------------------------------


def test_sparsity_zero_is_refused_by_pruning_commands_only():
    cfg = Config.from_overrides({"sparsity": "0"})  # a valid target for library users
    for command in ("main", "sweep", "search"):
        with pytest.raises(LangpruneError, match="sparsity=0 prunes nothing; use `dense`"):
            cli.check_command(command, cfg)
    for command in ("dense", "analyze", "report", "config"):
        cli.check_command(command, cfg)
    cli.check_command("main", Config())


def test_reports_folder_is_git_ignored():
    proc = subprocess.run(["git", "check-ignore", "-q", "reports/0123/summary.html"],
                          cwd=REPO_ROOT, capture_output=True)
    if proc.returncode == 128:
        pytest.skip("not a git checkout")
    assert proc.returncode == 0


def test_optuna_dashboard_is_an_optional_extra_the_readme_names():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("optuna-dashboard==") for d in
               project["optional-dependencies"]["dashboard"])
    assert not any("dashboard" in d for d in project["dependencies"])
    readme = (REPO_ROOT / "README.md").read_text()
    assert "optuna-dashboard" in readme and "pip install -e '.[dashboard]'" in readme


def test_suggestions_are_close_matches_only():
    from pipeline.registry import suggest

    tasks = ["injongointent_tasks", "noor_stem_tasks", "afrobench_sentiment_tasks", "sib200"]
    assert suggest("nonexistent_task", tasks) == ""
    assert suggest("sib2000", tasks) == "; did you mean sib200?"
    assert suggest("sparsty", list(Config.keys())).startswith("; did you mean sparsity")


def test_calib_source_errors_list_calibration_sources_only():
    from pipeline.data.documents import CALIBRATION
    from pipeline.data.sources import get_source

    with pytest.raises(LangpruneError) as err:
        get_source("nope", role=CALIBRATION)
    msg = str(err.value)
    assert "ntrex" in msg and "flores" not in msg and "belebele" not in msg
    assert "did you mean" not in msg
    with pytest.raises(LangpruneError, match="'flores' is evaluation text, not calibration"):
        get_source("flores", role=CALIBRATION)
    assert get_source("ntrex", role=CALIBRATION).name == "ntrex"


def test_long_error_lines_are_not_cut_mid_sentence():
    long = "word " * 120
    assert R._first_line(Exception(long + "end")).endswith("end")  # the console line: whole
    assert R.clip("short reason", 500) == "short reason"
    longer = ("alpha beta gamma " * 60).strip()
    cut = R.clip(longer, 500)
    assert len(cut) <= 500 and cut.endswith("…")
    assert cut[:-1].split(" ")[-1] in ("alpha", "beta", "gamma")  # ends on a whole word


def test_readme_calib_blend_row_matches_what_is_logged():
    params = P.to_mlflow_params(Config.from_overrides({"calib_lang": "zh"}))
    assert params["calib_blend"] == "" and params["blend"] == "zh:1.0"
    readme = (REPO_ROOT / "README.md").read_text()
    assert "`calib_blend` (as given" in readme and "`blend` (the resolved blend" in readme
    assert "`calib_blend` (resolved" not in readme


def test_readme_main_command_checks_the_store_first():
    readme = (REPO_ROOT / "README.md").read_text()
    assert "python -m pipeline check && mlflow run . --env-manager local " \
           "--experiment-name langprune -P calib_lang=zh" in readme
    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        assert var in readme


def test_model_file_checks_read_headers_only(tiny_model_dir: Path, tmp_path):
    from pipeline.model_files import check_gguf_header, check_weight_files

    check_weight_files(tiny_model_dir)  # a whole folder passes
    weights = tiny_model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    with pytest.raises(LangpruneError, match=f"model file {weights} is truncated"):
        check_weight_files(tiny_model_dir)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + (3).to_bytes(4, "little"))
    check_gguf_header(gguf)
    gguf.write_text("hello")
    with pytest.raises(LangpruneError, match="is not a GGUF file"):
        check_gguf_header(gguf)
