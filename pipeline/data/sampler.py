"""The calibration sampler: a :class:`CalibCfg` and a tokenizer -> reproducible token windows.

Definition (docs/science.md#calibration-data), named ``nonoverlap_grid_v1`` in the manifest:

1. Each language's corpus (``calib_source``) is tokenized document by document without
   special tokens, and the documents are concatenated in source order, separated by the
   tokens of :data:`DOC_SEPARATOR`. That is the language's *token stream*.
2. The stream is cut into non-overlapping windows of ``w`` text tokens from offset 0: the
   *grid*; the remainder is unused. ``w = seq_len - 1`` when the tokenizer has a BOS token,
   which then starts every window (BOS + ``seq_len - 1`` text tokens); otherwise
   ``w = seq_len``. Either way a window has exactly ``seq_len`` tokens and no padding.
3. A blend gives each language a whole number of windows by largest-remainder rounding of
   ``weight x n_samples`` (ties: alphabetical language code); languages with 0 are dropped.
4. The grid of each language is shuffled once by a permutation seeded by
   ``(seed, calib_source, language)``, independent of ``calib_set`` and of the blend;
   calibration set ``k`` with ``c`` windows takes positions ``[k*c, (k+1)*c)`` of it. So
   sets ``k != k'`` of the same size share no window, and the same config and seed give
   bit-identical windows.

Sample YAML::

    calib_lang: sw          # or calib_blend: "de:0.5,en:0.25,zh:0.25"
    calib_source: ntrex
    calib_set: 0
    n_samples: 32
    seq_len: 256
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.config import CalibCfg
from pipeline.data.documents import CALIBRATION
from pipeline.data.sources import SOURCES, check_available, get_source, load_documents
from pipeline.errors import LangpruneError
from pipeline.paths import data_dir

log = logging.getLogger(__name__)

WINDOW_DEFINITION = "nonoverlap_grid_v1"
MANIFEST_FORMAT = "langprune.calibration/1"
DOC_SEPARATOR = "\n\n"  # between documents of a token stream
_TOKENIZE_CHUNK = 256  # documents per tokenizer call (bounds peak memory on mC4)
_TOKEN_CACHE_SIZE = 32  # (tokenizer, source, language) streams kept in-process for sweeps


@dataclass(frozen=True)
class TokenStream:
    """A language corpus as one token sequence.

    Attributes:
        ids: int64 token ids (read-only), documents joined by :data:`DOC_SEPARATOR` tokens.
        doc_ids: document ids in stream order.
        doc_starts: offset in ``ids`` where each document's own tokens start.
    """

    ids: np.ndarray
    doc_ids: tuple[str, ...]
    doc_starts: np.ndarray

    def docs_between(self, start: int, stop: int) -> list[str]:
        """Ids of the documents that overlap tokens ``[start, stop)``."""
        first = int(np.searchsorted(self.doc_starts, start, side="right")) - 1
        last = int(np.searchsorted(self.doc_starts, stop - 1, side="right")) - 1
        return list(self.doc_ids[max(first, 0) : last + 1])


@dataclass(frozen=True)
class CalibrationSet:
    """The calibration windows of one config.

    Attributes:
        windows: ``LongTensor [n_samples, seq_len]``, languages in sorted order.
        manifest: JSON-serialisable record of what the windows are (see :func:`build_calibration`).
    """

    windows: torch.Tensor
    manifest: dict[str, Any]

    @property
    def counts(self) -> dict[str, int]:
        """Windows per language."""
        return dict(self.manifest["counts"])


# ---- counts --------------------------------------------------------------------------------
def largest_remainder(weights: Mapping[str, float], n: int) -> dict[str, int]:
    """Split ``n`` windows among languages by largest-remainder (Hamilton) rounding.

    Every language first gets ``floor(n * w / sum(w))``; the windows left over go, one each,
    to the largest fractional remainders, ties broken by language code (alphabetical). The
    counts sum to ``n``; languages may get 0.

    Args:
        weights: language -> non-negative finite weight (need not sum to 1).
        n: number of windows, >= 0.

    Returns:
        language -> count, in sorted language order.

    Raises:
        LangpruneError: negative/NaN/infinite weights, all-zero weights, empty weights or n < 0.
    """
    if n < 0:
        raise LangpruneError(f"number of windows must be >= 0, got {n}")
    if not weights:
        raise LangpruneError("blend is empty")
    for lang, w in weights.items():
        if not math.isfinite(w) or w < 0:
            raise LangpruneError(f"blend weight for {lang!r} must be finite and >= 0, got {w}")
    total = math.fsum(weights.values())
    if total <= 0:
        raise LangpruneError("blend weights are all zero")
    quotas = {lang: n * w / total for lang, w in sorted(weights.items())}
    # The epsilon and rounding stop float noise (0.7 * 10 = 7.000000000000001) from
    # deciding floors or ties.
    floors = {lang: math.floor(q + 1e-9) for lang, q in quotas.items()}
    left = n - sum(floors.values())
    order = sorted(quotas, key=lambda lang: (-round(quotas[lang] - floors[lang], 9), lang))
    for lang in order[: max(left, 0)]:
        floors[lang] += 1
    return floors


def count_windows(calib: CalibCfg) -> dict[str, int]:
    """Windows per language for a config: largest remainder of its blend, zeros dropped.

    Cheap (no data is read); the counts are what :func:`build_calibration` produces.
    """
    counts = largest_remainder(calib.blend, calib.n_samples)
    dropped = [lang for lang, c in counts.items() if c == 0]
    if dropped:
        log.info("blend languages with 0 of %d windows dropped: %s", calib.n_samples, dropped)
    return {lang: c for lang, c in counts.items() if c > 0}


def text_tokens_per_window(tokenizer: Any, seq_len: int) -> int:
    """Text tokens per window: ``seq_len - 1`` with a BOS token, else ``seq_len``."""
    return seq_len - 1 if _bos_id(tokenizer) is not None else seq_len


# ---- token streams ---------------------------------------------------------------------------
def token_stream(tokenizer: Any, source: str, lang: str) -> TokenStream:
    """The token stream of ``source`` in ``lang``, cached in-process (sweeps reuse it).

    The cache key is the tokenizer object, the source, the language and the data folder.
    """
    check_available(source, lang)
    root = "" if get_source(source).hub else str(data_dir().resolve())
    try:
        hash(tokenizer)
    except TypeError:  # an unhashable tokenizer cannot be a cache key: tokenize every time
        return _tokenize(tokenizer, source, lang)
    return _cached_stream(tokenizer, source, lang, root)


def available_windows(tokenizer: Any, source: str, lang: str, seq_len: int) -> int:
    """How many non-overlapping windows of ``seq_len`` tokens the corpus holds."""
    stream = token_stream(tokenizer, source, lang)
    return len(stream.ids) // text_tokens_per_window(tokenizer, seq_len)


def clear_token_cache() -> None:
    """Forget every cached token stream (tests; after editing data files in place)."""
    _cached_stream.cache_clear()


@functools.lru_cache(maxsize=_TOKEN_CACHE_SIZE)
def _cached_stream(tokenizer: Any, source: str, lang: str, root: str) -> TokenStream:
    del root  # part of the cache key only
    return _tokenize(tokenizer, source, lang)


def _tokenize(tokenizer: Any, source: str, lang: str) -> TokenStream:
    docs = load_documents(source, lang)
    sep = list(tokenizer.encode(DOC_SEPARATOR, add_special_tokens=False))
    ids: list[int] = []
    starts: list[int] = []
    for i in range(0, len(docs), _TOKENIZE_CHUNK):
        chunk = docs[i : i + _TOKENIZE_CHUNK]
        encoded = tokenizer([d.text for d in chunk], add_special_tokens=False, verbose=False)[
            "input_ids"
        ]
        for doc_tokens in encoded:
            if ids:
                ids.extend(sep)
            starts.append(len(ids))
            ids.extend(doc_tokens)
    if not ids:
        raise LangpruneError(f"calibration corpus {source}/{lang} tokenizes to no tokens")
    arr = np.asarray(ids, dtype=np.int64)
    arr.flags.writeable = False  # the cached stream is shared
    starts_arr = np.asarray(starts, dtype=np.int64)
    starts_arr.flags.writeable = False
    return TokenStream(arr, tuple(d.doc_id for d in docs), starts_arr)


# ---- the sampler -----------------------------------------------------------------------------
def build_calibration(
    tokenizer: Any, calib: CalibCfg, seed: int, *, progress: bool = True
) -> CalibrationSet:
    """Build the calibration windows of ``calib`` (see the module docstring for the rules).

    Needs only the tokenizer, so it can run (and fail) before the model is loaded.

    Args:
        tokenizer: a Hugging Face tokenizer; its BOS token, if any, starts every window.
        calib: blend, ``calib_source``, ``calib_set``, ``n_samples`` and ``seq_len``.
        seed: the run seed; with the config it fixes the windows bit for bit.
        progress: show a tokenization progress bar.

    Returns:
        The windows and a manifest with per-language counts and, per window, its language,
        source, grid index, token start offset in that language's stream and the document
        ids it covers; plus blend, calib_set, seed, source, tokenizer name, BOS handling and
        a sha256 of the windows.

    Raises:
        LangpruneError: before any tokenization for an unknown or evaluation-only source, bad
            blend or a language the source lacks; after tokenization (still before any model
            work) when a corpus is too short for ``(calib_set + 1) x count`` windows.
    """
    counts = count_windows(calib)
    source = calib.calib_source
    _check_source(source, counts)
    width = text_tokens_per_window(tokenizer, calib.seq_len)
    streams = {
        lang: token_stream(tokenizer, source, lang)
        for lang in tqdm(counts, desc=f"tokenize {source}", disable=not progress)
    }
    _check_lengths(tokenizer, calib, counts, streams, width)
    windows, records = _cut_windows(tokenizer, calib, seed, counts, streams, width)
    manifest = _manifest(tokenizer, calib, seed, counts, streams, width, records, windows)
    log.info("calibration: %s windows of %d tokens, set %d (sha256 %s)",
             "+".join(f"{lang} {c}" for lang, c in counts.items()), calib.seq_len,
             calib.calib_set, manifest["windows_sha256"][:12])
    return CalibrationSet(torch.from_numpy(windows), manifest)


def check_corpus(calib: CalibCfg) -> None:
    """Cheap checks of a calibration config's text without a tokenizer.

    The source must be calibration text with every language of the blend; bundled files
    are read (missing, corrupt or non-UTF-8 files fail here, naming the file). Hub sources
    are only checked for reachability when loaded.

    Raises:
        LangpruneError: one of the problems above.
    """
    counts = count_windows(calib)
    _check_source(calib.calib_source, counts)
    if not get_source(calib.calib_source).hub:
        for lang in counts:
            load_documents(calib.calib_source, lang)


def _check_source(source: str, counts: Mapping[str, int]) -> None:
    """The source must be calibration text and have every language of the blend."""
    if source in SOURCES and SOURCES.get(source).role != CALIBRATION:
        usable = [n for n in SOURCES.names() if SOURCES.get(n).role == CALIBRATION]
        raise LangpruneError(
            f"calib_source {source!r} is evaluation text; calibrating on it would overlap"
            f" evaluation. Calibration sources: {', '.join(usable)}"
        )
    get_source(source, role=CALIBRATION)  # unknown: lists calibration sources only
    for lang in counts:
        check_available(source, lang)


def _cut_windows(
    tokenizer: Any,
    calib: CalibCfg,
    seed: int,
    counts: Mapping[str, int],
    streams: Mapping[str, TokenStream],
    width: int,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Take set ``calib_set`` of each language's shuffled grid; BOS first when there is one."""
    bos = _bos_id(tokenizer)
    windows = np.empty((calib.n_samples, calib.seq_len), dtype=np.int64)
    records: list[dict[str, Any]] = []
    for lang, count in counts.items():
        stream = streams[lang]
        order = _grid_order(len(stream.ids) // width, seed, calib.calib_source, lang)
        for grid_index in order[calib.calib_set * count : (calib.calib_set + 1) * count]:
            start = int(grid_index) * width
            row = len(records)
            if bos is not None:
                windows[row, 0] = bos
            windows[row, calib.seq_len - width :] = stream.ids[start : start + width]
            records.append(
                {
                    "index": row,
                    "language": lang,
                    "source": calib.calib_source,
                    "grid_index": int(grid_index),
                    "token_start": start,
                    "doc_ids": stream.docs_between(start, start + width),
                }
            )
    assert len(records) == calib.n_samples, "largest_remainder counts must sum to n_samples"
    return windows, records


def _check_lengths(
    tokenizer: Any,
    calib: CalibCfg,
    counts: Mapping[str, int],
    streams: Mapping[str, TokenStream],
    width: int,
) -> None:
    short = []
    for lang, count in counts.items():
        have = len(streams[lang].ids)
        need = (calib.calib_set + 1) * count * width
        if have < need:
            short.append(
                f"{calib.calib_source}/{lang} has {have:,} tokens but calib_set={calib.calib_set}"
                f" with {count} windows of {width} text tokens needs"
                f" ({calib.calib_set}+1) x {count} x {width} = {need:,}"
            )
    if short:
        raise LangpruneError(
            f"calibration corpus too short (tokenizer {_tok_name(tokenizer)}): "
            + "; ".join(short)
            + "; lower n_samples, seq_len or calib_set, or choose another calib_source"
        )


def _grid_order(n_windows: int, seed: int, source: str, lang: str) -> np.ndarray:
    """The seeded shuffle of a language's grid; independent of calib_set and the blend."""
    digest = hashlib.sha256(f"langprune-calibration:{seed}:{source}:{lang}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randperm(n_windows, generator=generator).numpy()


def _manifest(
    tokenizer: Any,
    calib: CalibCfg,
    seed: int,
    counts: Mapping[str, int],
    streams: Mapping[str, TokenStream],
    width: int,
    records: list[dict[str, Any]],
    windows: np.ndarray,
) -> dict[str, Any]:
    bos = _bos_id(tokenizer)
    per_lang = {
        lang: {
            "stream_tokens": len(streams[lang].ids),
            "documents": len(streams[lang].doc_ids),
            "windows_available": len(streams[lang].ids) // width,
            "windows": count,
        }
        for lang, count in counts.items()
    }
    return {
        "format": MANIFEST_FORMAT,
        "definition": WINDOW_DEFINITION,
        "source": calib.calib_source,
        "blend": dict(calib.blend),
        "counts": dict(counts),
        "calib_set": calib.calib_set,
        "seed": seed,
        "n_samples": calib.n_samples,
        "seq_len": calib.seq_len,
        "text_tokens_per_window": width,
        "bos_token_id": bos,
        "bos_prepended": bos is not None,
        "window_layout": (
            f"BOS + {width} text tokens" if bos is not None else f"{width} text tokens"
        ),
        "doc_separator": DOC_SEPARATOR,
        "tokenizer": _tok_name(tokenizer),
        "tokenizer_class": type(tokenizer).__name__,
        "languages": per_lang,
        "windows": records,
        "windows_sha256": hashlib.sha256(np.ascontiguousarray(windows).tobytes()).hexdigest(),
    }


def _bos_id(tokenizer: Any) -> int | None:
    bos = getattr(tokenizer, "bos_token_id", None)
    return None if bos is None else int(bos)


def _tok_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
