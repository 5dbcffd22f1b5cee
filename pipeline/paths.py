"""Where bundled data and caches live. One place, so nothing hard-codes a path."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """Bundled data folder: ``$LANGPRUNE_DATA`` or ``<repo>/data``."""
    return Path(os.environ.get("LANGPRUNE_DATA", REPO_ROOT / "data"))


def cache_dir(configured: str = "") -> Path:
    """Model/analysis cache: the configured folder, ``$LANGPRUNE_CACHE`` or ~/.cache/langprune.

    Never inside the repository: converted model weights must not be committed.
    """
    base = configured or os.environ.get("LANGPRUNE_CACHE") or Path.home() / ".cache" / "langprune"
    return Path(base).expanduser()


def check_writable(folder: Path, key: str) -> None:
    """Create ``folder`` and write a probe file there; one-line error naming config ``key``.

    Raises:
        LangpruneError: the folder cannot be created or written (before any heavy work).
    """
    from pipeline.errors import LangpruneError

    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise LangpruneError(f"{key} {folder} is not writable: {e.strerror}") from None
