"""How langprune's MLflow client rides out a tracking server that goes away for a while.

MLflow's REST client retries *every* request (all HTTP methods, connection errors, 429 and
5xx answers) with exponential backoff; four environment variables control it. Their MLflow
defaults (7 retries, backoff factor 2) give up after about 4 minutes. An overnight run should
survive a server restart or a database fail-over of several minutes, and should notice
quickly when the server is back, so the CLI sets these defaults when the user has not set
the variables (an explicit setting always wins):

- ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=10`` (the most MLflow accepts),
- ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1``: waits of 0, 2, 4, 8, ... s, capped at 120 s by
  urllib3, so about 8 minutes in all before a request fails,
- ``MLFLOW_HTTP_REQUEST_BACKOFF_JITTER=1.0``: up to 1 s random extra per wait, so workers
  that lost the server together do not come back in lockstep,
- ``MLFLOW_HTTP_REQUEST_TIMEOUT=120``: seconds one request may take.

Retries never change results; the effective values are recorded on every run as the tag
:data:`TAG_HTTP_RETRIES` so a run that waited out an outage can be explained. This module
imports nothing heavy (the CLI calls it before anything else).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

TAG_HTTP_RETRIES = "langprune.http_retries"
MAX_RETRIES = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
BACKOFF_FACTOR = "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"
BACKOFF_JITTER = "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"
TIMEOUT = "MLFLOW_HTTP_REQUEST_TIMEOUT"

HTTP_RETRY_DEFAULTS: Mapping[str, str] = {
    MAX_RETRIES: "10",
    BACKOFF_FACTOR: "1",  # MLflow parses it as an int: 1 is the gentlest exponential backoff
    BACKOFF_JITTER: "1.0",
    TIMEOUT: "120",
}
# What MLflow itself uses when a variable is unset (mlflow/environment_variables.py).
_MLFLOW_DEFAULTS: Mapping[str, str] = {MAX_RETRIES: "7", BACKOFF_FACTOR: "2",
                                       BACKOFF_JITTER: "1.0", TIMEOUT: "120"}
# A start-up probe of the tracking store: a dead URI is bad input, reported in seconds.
PROBE_SETTINGS: Mapping[str, str] = {MAX_RETRIES: "1", BACKOFF_FACTOR: "1", TIMEOUT: "15"}


def apply_http_retry_defaults() -> dict[str, str]:
    """Set :data:`HTTP_RETRY_DEFAULTS` for every variable the user left unset.

    Returns:
        The effective settings (variable -> value).
    """
    for key, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return effective_http_retries()


def effective_http_retries() -> dict[str, str]:
    """The settings MLflow's client uses now (its own defaults where a variable is unset)."""
    return {k: os.environ.get(k, _MLFLOW_DEFAULTS[k]) for k in _MLFLOW_DEFAULTS}


def http_retry_tag() -> str:
    """``max_retries=10,backoff_factor=1,backoff_jitter=1.0,timeout=120`` (run tag value)."""
    names = {MAX_RETRIES: "max_retries", BACKOFF_FACTOR: "backoff_factor",
             BACKOFF_JITTER: "backoff_jitter", TIMEOUT: "timeout"}
    return ",".join(f"{names[k]}={v}" for k, v in effective_http_retries().items())


@contextmanager
def quick_http_failure() -> Iterator[None]:
    """Within the block, MLflow requests give up after one quick retry.

    Used for the start-up reachability check only (no other thread talks to the store then):
    a tracking URI that is wrong or down must be one clear error, not minutes of retries.
    """
    saved = {k: os.environ.get(k) for k in PROBE_SETTINGS}
    os.environ.update(PROBE_SETTINGS)
    # urllib3 logs each retry as a WARNING; the caller's one error line says it all.
    pool_log = logging.getLogger("urllib3.connectionpool")
    level = pool_log.level
    pool_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        pool_log.setLevel(level)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
