"""The HTTP retry defaults: applied only where the user set nothing, accepted by MLflow, recorded
on every run, and never used by the start-up reachability probe."""

from __future__ import annotations

import os

import pytest

from pipeline.config import Config
from tracking import params as P
from tracking import reliability as REL


@pytest.fixture
def clean_env(monkeypatch):
    for key in REL.HTTP_RETRY_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_defaults_fill_only_unset_variables(clean_env):
    clean_env.setenv(REL.BACKOFF_FACTOR, "5")  # the user's choice wins
    got = REL.apply_http_retry_defaults()
    assert got == {REL.MAX_RETRIES: "10", REL.BACKOFF_FACTOR: "5", REL.BACKOFF_JITTER: "1.0",
                   REL.TIMEOUT: "120"}
    assert {k: os.environ[k] for k in got} == got


def test_mlflow_reads_and_accepts_our_defaults(clean_env):
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_BACKOFF_JITTER,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )
    from mlflow.utils.rest_utils import _validate_backoff_factor, _validate_max_retries

    REL.apply_http_retry_defaults()
    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 10
    assert MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() == 1
    assert MLFLOW_HTTP_REQUEST_BACKOFF_JITTER.get() == 1.0
    assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 120
    _validate_max_retries(10)  # MLflow refuses more than its limit
    _validate_backoff_factor(1)


def test_the_effective_settings_are_a_run_tag(clean_env):
    tags = P.run_tags(Config.from_overrides({}), "pruned", "cpu", "main")
    assert tags[REL.TAG_HTTP_RETRIES] == (
        "max_retries=7,backoff_factor=2,backoff_jitter=1.0,timeout=120")  # MLflow's own
    REL.apply_http_retry_defaults()
    tags = P.run_tags(Config.from_overrides({}), "pruned", "cpu", "main")
    assert tags[REL.TAG_HTTP_RETRIES] == (
        "max_retries=10,backoff_factor=1,backoff_jitter=1.0,timeout=120")


def test_the_reachability_probe_fails_fast_and_restores_the_settings(clean_env):
    clean_env.setenv(REL.MAX_RETRIES, "9")
    with REL.quick_http_failure():
        assert os.environ[REL.MAX_RETRIES] == "1" and os.environ[REL.TIMEOUT] == "15"
    assert os.environ[REL.MAX_RETRIES] == "9" and REL.TIMEOUT not in os.environ
