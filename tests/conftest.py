"""Shared fixtures: a tiny model folder, a SQLite MLflow store, a real local mlflow server, a
throwaway PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.servers import MlflowServer, PostgresCluster, postgres_bin
from tests.stores import use_store


@pytest.fixture(scope="session")
def _empty_mlflow_db(tmp_path_factory) -> Path:
    """An MLflow SQLite database with its schema, made once (the migrations take seconds)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, monkeypatch, _empty_mlflow_db):
    """A SQLite MLflow store (and model/statistics cache) in ``tmp_path``, the working folder."""
    import shutil
    import sqlite3

    import mlflow
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    shutil.copyfile(_empty_mlflow_db, db)
    with sqlite3.connect(db) as con:  # the Default experiment's artifacts belong here too
        con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                    (str(tmp_path / "mlruns" / "0"),))
    con.close()
    uri = f"sqlite:///{db}"
    use_store(monkeypatch, tmp_path, uri)
    yield MlflowClient(uri)
    mlflow.set_tracking_uri(None)


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path)
    try:  # a start that times out still leaves a process to stop
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def tiny_model_dir(tmp_path) -> Path:
    """A tiny random Llama with a byte-level tokenizer, saved as a local HF folder."""
    import torch
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = ByT5Tokenizer()
    cfg = LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=None, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster for the session, stopped and deleted afterwards.

    Skips with the reason when Debian's PostgreSQL is not installed, unless
    ``LANGPRUNE_REQUIRE_POSTGRES=1`` (set by ``.ci/run``, which installs it): then it fails.
    """
    import os
    import shutil
    import tempfile

    bin_dir = postgres_bin()
    if bin_dir is None:
        msg = ("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin): "
               "apt-get install postgresql")
        if os.environ.get("LANGPRUNE_REQUIRE_POSTGRES") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    # Under /tmp, not pytest's tmp_path: as root the server runs as user postgres, which cannot
    # enter pytest's private (0700, root-owned) base folder.
    root = Path(tempfile.mkdtemp(prefix="langprune-pg-"))
    cluster = PostgresCluster(root, bin_dir)
    try:
        cluster.start()
        yield cluster
    finally:
        try:
            cluster.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)
