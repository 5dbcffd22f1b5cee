"""Text sources on the Hugging Face hub: mC4 (calibration), FLORES+ and Belebele (evaluation).

They call ``datasets.load_dataset`` and exist for users with network access; the registry in
:mod:`pipeline.data.sources` lists them next to the bundled sources.

Hub sources fail fast offline: ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` or an endpoint
that does not answer within :data:`HUB_TIMEOUT_S` seconds gives a one-line
:class:`~pipeline.errors.LangpruneError` before ``datasets`` is even imported.
"""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request
from typing import Any

from pipeline.data.documents import CALIBRATION, EVAL, Document, _group
from pipeline.data.languages import Language
from pipeline.errors import LangpruneError

MC4_ID = "allenai/c4"  # mC4 3.1.0 lives in allenai/c4 with one config per language
FLORES_PLUS_ID = "openlanguagedata/flores_plus"  # gated: accept its terms on the hub first
BELEBELE_ID = "facebook/belebele"
# The first MC4_MAX_DOCUMENTS documents of the train split in file order (deterministic);
# about 2-4M tokens per language, enough for 3 sets x 128 windows x 2048 tokens.
MC4_MAX_DOCUMENTS = 5000
HUB_TIMEOUT_S = 5.0  # reachability check before any hub call, so offline fails in seconds
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUE = {"1", "ON", "YES", "TRUE"}
# Hub source -> the key of its config name in a language's ``hub`` entry (languages.yaml).
_HUB_CONFIG_KEY = {"mc4": "mc4", "flores_hub": "flores_plus", "belebele_hub": "belebele"}


def _require_hub(source: str, role: str) -> None:
    """Fail fast, before importing ``datasets``, when the hub is off or unreachable."""
    # Imported here, not at the top: the registry imports this module to register its loaders.
    from pipeline.data.sources import SOURCES

    alternatives = ", ".join(
        n for n in SOURCES.names() if SOURCES.get(n).role == role and not SOURCES.get(n).hub
    )
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().upper() in _TRUE:
            raise LangpruneError(
                f"source {source!r} needs the Hugging Face hub but {var} is set (offline);"
                f" use a bundled {role} source: {alternatives}"
            )
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    if not _hub_reachable(endpoint, HUB_TIMEOUT_S):
        raise LangpruneError(
            f"source {source!r} needs the Hugging Face hub but {endpoint} is unreachable"
            f" (checked with a {HUB_TIMEOUT_S:g} s timeout); use a bundled {role} source:"
            f" {alternatives}"
        )


def _hub_reachable(endpoint: str, timeout: float) -> bool:
    """Whether ``endpoint`` answers an HTTP HEAD within ``timeout`` seconds (any status).

    Runs in a daemon thread joined with a deadline, because DNS resolution is not bounded
    by the socket timeout. Proxies from the environment are honoured by urllib.
    """
    result: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
            result.append(True)
        except urllib.error.HTTPError:
            result.append(True)  # the server answered, with an error status: reachable
        except (OSError, ValueError):
            result.append(False)

    thread = threading.Thread(target=probe, name="langprune-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(result and result[0])


def _load_hub(source: str, role: str, path: str, config: str, **kwargs: Any) -> Any:
    """``datasets.load_dataset(path, config, **kwargs)`` with the fast offline check first."""
    _require_hub(source, role)
    import datasets  # heavy; imported only when the hub is actually used

    try:
        return datasets.load_dataset(path, config, **kwargs)
    except Exception as e:  # gated, missing config, network drop: one clear line for the user
        raise LangpruneError(
            f"source {source!r}: could not load {path} ({config}):"
            f" {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e


def _mc4(lang: Language) -> list[Document]:
    config = lang.hub["mc4"]
    stream = _load_hub("mc4", CALIBRATION, MC4_ID, config, split="train", streaming=True)
    docs: list[Document] = []
    for i, row in enumerate(stream):
        if i >= MC4_MAX_DOCUMENTS:
            break
        text = str(row.get("text") or "").strip()
        if text:
            docs.append(Document(str(row.get("url") or f"{config}-{i}"), text))
    return docs


def _flores_hub_rows(lang: Language) -> list[dict[str, Any]]:
    config = lang.hub["flores_plus"]
    return list(_load_hub("flores_hub", EVAL, FLORES_PLUS_ID, config, split="devtest"))


def _flores_hub_documents(lang: Language) -> list[Document]:
    rows = _flores_hub_rows(lang)
    texts = [str(r.get("text") or "") for r in rows]
    return _group((str(r.get("url") or i) for i, r in enumerate(rows)), texts)


def _flores_hub_sentences(lang: Language) -> list[str]:
    return [s for s in (str(r.get("text") or "").strip() for r in _flores_hub_rows(lang)) if s]


def _belebele_passages(lang: Language) -> list[Document]:
    # Belebele's passages are FLORES passages: unique passages, keyed by their link.
    rows = _load_hub("belebele_hub", EVAL, BELEBELE_ID, lang.hub["belebele"], split="test")
    passages: dict[str, str] = {}
    for i, row in enumerate(rows):
        text = str(row.get("flores_passage") or "").strip()
        if text:
            passages.setdefault(str(row.get("link") or i), text)
    return [Document(k, v) for k, v in passages.items()]


def _belebele_sentences(lang: Language) -> list[str]:
    return [d.text for d in _belebele_passages(lang)]
