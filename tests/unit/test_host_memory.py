"""pipeline.host_memory: glibc's malloc keeps freed tensor memory instead of re-faulting it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline import host_memory

# Allocates a 24 MB tensor (the size of large activations) in a fresh process and reads glibc's
# mallinfo2: whether the block was mmap-ed (glibc's default for blocks over 128 KB, given back
# to the kernel on free, so the next one is faulted in afresh) or served from the heap, and how
# much free memory the heap keeps after the tensor is freed.
_PROBE = """
import ctypes, json, sys, torch
from pipeline.host_memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "1" else False
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena ordblks smblks hblks hblkhd usmblks "
                                               "fsmblks uordblks fordblks keepcost").split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
mapped = libc.mallinfo2().hblkhd
x = torch.ones(6 * 1024 * 1024)
mapped_live = libc.mallinfo2().hblkhd - mapped
del x
print(json.dumps({"kept": kept, "mapped": mapped_live, "heap_free": libc.mallinfo2().fordblks}))
"""


def _probe(tune: bool, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT)}
    out = subprocess.run([sys.executable, "-c", _PROBE, "1" if tune else "0"],
                         capture_output=True, text=True, check=True, env={**clean, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory._glibc() is None, reason="glibc only (a no-op elsewhere)")
def test_freed_blocks_are_kept_in_the_heap_instead_of_unmapped():
    mb24 = 24 * 1024 * 1024
    default = _probe(tune=False)
    kept = _probe(tune=True)
    assert kept["kept"] is True
    assert default["mapped"] >= mb24  # glibc's default: mmap-ed, unmapped again on free
    assert kept["mapped"] == 0 and kept["heap_free"] >= mb24  # tuned: heap, kept for reuse


def test_the_users_own_malloc_settings_and_the_opt_out_win():
    assert _probe(tune=True, MALLOC_ARENA_MAX="4")["kept"] is False
    assert _probe(tune=True, **{host_memory.OPT_OUT: "0"})["kept"] is False
