"""Keep freed CPU memory for reuse: glibc's allocator set up for tensor work.

A decoder layer's forward on the CPU allocates and frees activations of a few to tens of
MB (Gemma 3 270M, 8 x 256 tokens: 5 MB hidden states, 16 MB MLP intermediates). glibc's
default ``malloc`` serves such blocks with ``mmap`` and returns them to the kernel on
``free`` (or trims its heap), so the next allocation of the same size faults every page in
again and the kernel zeroes it: 0.85 million minor faults (3.4 GB) per forward of all 18
layers over 16 windows, every forward, 13% of the forward's CPU time (8.1 vs 7.1 s, one
thread; ``benchmarks/prune_vs_llmcompressor.py`` and RESULTS.md "Allocator"). With blocks up
to 32 MiB served from the heap, a heap that is not trimmed, and one arena (the one-pass
sequential prune runs each batch's forward in a thread of its own, one at a time; per-thread
arenas would each grow and shrink on their own), the faults go away after the first forward.

This is the tuning PyTorch's CPU performance guide does with jemalloc or tcmalloc preloaded;
``mallopt`` does it without another library. The price is resident memory: freed blocks under
32 MiB stay with the process instead of going back to the kernel. Blocks above 32 MiB (model
weights of large models, logits) are still ``mmap``-ed and returned.

Nothing here runs at import. The jobs call :func:`keep_freed_memory` once at start-up; a
library user may call it too. It changes nothing where the C library is not glibc, or when
the user set any of glibc's own ``MALLOC_*_`` variables (the user's choice wins), or when
``LANGPRUNE_KEEP_FREED_MEMORY=0``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's maximum for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: keep up to 2 GiB of free heap top for reuse
OPT_OUT = "LANGPRUNE_KEEP_FREED_MEMORY"

_applied = False


def _user_tuned() -> str | None:
    """The first glibc ``MALLOC_*_`` tunable the user set, if any."""
    names = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
             "MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES")
    return next((n for n in names if n in os.environ), None)


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (musl and others have no such symbol)
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def keep_freed_memory() -> bool:
    """Tune glibc's ``malloc`` so freed tensor memory is reused instead of re-faulted.

    Idempotent. Returns True if the settings are in effect (now or from an earlier call),
    False if nothing was changed (not glibc, the user's own ``MALLOC_*_`` settings, or
    ``LANGPRUNE_KEEP_FREED_MEMORY=0``).
    """
    global _applied
    if _applied:
        return True
    if os.environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        log.debug("allocator left as it is (%s=0)", OPT_OUT)
        return False
    user = _user_tuned()
    if user is not None:
        log.debug("allocator left as it is: %s is set", user)
        return False
    libc = _glibc()
    if libc is None:
        log.debug("allocator left as it is: not glibc")
        return False
    ok = all(libc.mallopt(p, v) == 1 for p, v in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_ARENA_MAX, 1),
    ))
    if not ok:
        log.debug("mallopt refused a setting; allocator may be partly tuned")
    _applied = ok
    return ok
