"""Hugging Face hub reachability, answered in seconds instead of minutes of retries.

Offline mode (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``) is read from the environment at
call time; otherwise a TCP probe of the hub endpoint (or the HTTPS proxy) with a short
timeout decides whether the hub is online.
"""

from __future__ import annotations

import logging
import os
import socket
from urllib.parse import urlparse

log = logging.getLogger(__name__)

_HUB_PROBE_TIMEOUT_S = 3.0


def env_flag(key: str) -> bool:
    """True when environment variable ``key`` is set to 1/on/yes/true (any case)."""
    return os.environ.get(key, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline_flag() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` asks for offline mode."""
    from huggingface_hub import constants

    # The constant is read at import time; the environment may have changed since.
    flags = (env_flag("HF_HUB_OFFLINE"), env_flag("TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any(flags)


def _hub_endpoint() -> tuple[str, int]:
    """Host and port a hub request would connect to first (the HTTPS proxy when one is set)."""
    from huggingface_hub import constants

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    default_port = 443 if url.scheme == "https" else 80
    return url.hostname or "huggingface.co", url.port or default_port


def _offline_reason() -> str:
    if hub_offline_flag():
        return "HF_HUB_OFFLINE is set"
    host, port = _hub_endpoint()
    return f"cannot connect to {host}:{port}"


def hub_online(timeout_s: float = _HUB_PROBE_TIMEOUT_S) -> bool:
    """True unless offline mode is set or the hub endpoint refuses a TCP connection.

    transformers retries an unreachable hub for about half a minute per file; this probe
    answers in at most ``timeout_s`` seconds.
    """
    if hub_offline_flag():
        return False
    host, port = _hub_endpoint()
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        log.info("Hugging Face hub %s:%d unreachable; using the local cache only", host, port)
        return False
