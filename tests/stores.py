"""Pointing a test process at a SQLite MLflow store, and the tiny tracked Gemma 3 that the
module-scoped sweep -> analyze tests share."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def use_store(mp: pytest.MonkeyPatch, root: Path, uri: str) -> None:
    """Point this process at the store ``uri``, with its cache and working folder in ``root``
    and no ``mlflow run`` run or experiment inherited from the environment."""
    import mlflow

    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("LANGPRUNE_CACHE", str(root / "cache"))
    mp.delenv("MLFLOW_RUN_ID", raising=False)
    mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mp.chdir(root)
    mlflow.set_tracking_uri(uri)


@contextmanager
def tiny_gemma_store(root: Path) -> Iterator[tuple[pytest.MonkeyPatch, Path, str]]:
    """For module-scoped fixtures: a tiny Gemma 3 folder (:func:`tests.tiny.save_tiny_gemma`)
    and a fresh SQLite store in ``root``, used as in :func:`use_store`; yields
    ``(monkeypatch, model_dir, uri)`` and undoes it all on exit."""
    import mlflow

    from tests.tiny import save_tiny_gemma

    model_dir = root / "tiny-gemma3"
    save_tiny_gemma(model_dir)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        use_store(mp, root, uri)
        try:
            yield mp, model_dir, uri
        finally:
            mlflow.set_tracking_uri(None)
