"""pipeline.host_memory: glibc's malloc keeps freed tensor memory instead of re-faulting it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline import host_memory

# Computes a 16 MB tensor (an MLP intermediate's size) and frees it, 50 times after a warm-up,
# and prints the minor page faults of those 50: with glibc's defaults each result is mmap-ed
# afresh and faulted in (4096 small pages, or 8 or more where the kernel backs the block with
# transparent huge pages); with the tuning the freed block is reused.
_PROBE = """
import json, resource, sys, torch
from pipeline.host_memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "1" else False
y = torch.ones(4096, 1024)
for _ in range(3):
    x = y * 2
    del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    x = y * 2
    del x
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"kept": kept, "faults": faults}))
"""


def _probe(tune: bool, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT)}
    out = subprocess.run([sys.executable, "-c", _PROBE, "1" if tune else "0"],
                         capture_output=True, text=True, check=True, env={**clean, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory._glibc() is None, reason="glibc only (a no-op elsewhere)")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    default = _probe(tune=False)
    kept = _probe(tune=True)
    assert kept["kept"] is True
    assert default["faults"] >= 50 * 8, default
    assert kept["faults"] < 50, kept


def test_the_users_own_malloc_settings_and_the_opt_out_win():
    assert _probe(tune=True, MALLOC_ARENA_MAX="4")["kept"] is False
    assert _probe(tune=True, **{host_memory.OPT_OUT: "0"})["kept"] is False
