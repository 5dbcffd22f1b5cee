"""Cheap integrity checks of model files, read before any weights are loaded.

A ``.gguf`` file's magic and version, each ``.safetensors`` file's header against its size,
the shards a safetensors index names, and a file's SHA-256 (the GGUF cache key): each
problem is one :class:`~pipeline.errors.LangpruneError` line naming the file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.errors import LangpruneError

GGUF_MAGIC = b"GGUF"
_GGUF_VERSIONS = (2, 3)  # what the gguf package (and so transformers) reads
_SAFETENSORS_MAX_HEADER = 100 * 2**20  # the format's own limit on the JSON header


def check_gguf_header(path: Path) -> None:
    """A ``.gguf`` file must start with the GGUF magic and a version transformers reads.

    Raises:
        LangpruneError: naming the file and what is wrong (a text file named ``x.gguf``,
            a truncated download, an unsupported version).
    """
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as e:
        raise LangpruneError(f"cannot read model file {path}: {e.strerror}") from None
    if head[:4] != GGUF_MAGIC:
        raise LangpruneError(
            f"model file {path} is not a GGUF file: it does not start with the GGUF magic "
            f"bytes (found {head[:4]!r})")
    if len(head) < 8:
        raise LangpruneError(f"model file {path} is truncated: {len(head)} bytes, no GGUF header")
    version = int.from_bytes(head[4:8], "little")
    if version not in _GGUF_VERSIONS:
        raise LangpruneError(
            f"model file {path} has GGUF version {version}; readable versions: "
            f"{', '.join(map(str, _GGUF_VERSIONS))}")


def check_weight_files(folder: Path) -> None:
    """Every ``*.safetensors`` file of a model folder must be whole; shards an index names
    must exist.

    Reads only each file's header (its JSON table of tensors and byte ranges) and compares
    the size the header needs with the file's size, so a truncated or foreign file is one
    line before any run starts, not an error deep inside ``from_pretrained``.

    Raises:
        LangpruneError: naming the file and what is wrong.
    """
    for index in sorted(folder.glob("*.safetensors.index.json")):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise LangpruneError(
                f"model index {index} is not a safetensors index (no readable weight_map)"
            ) from None
        for shard in sorted(shards):
            if not (folder / shard).is_file():
                raise LangpruneError(f"model file {folder / shard} is missing ({index.name} "
                                     "names it)")
    for file in sorted(folder.glob("*.safetensors")):
        _check_safetensors(file)


def _check_safetensors(path: Path) -> None:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LangpruneError(f"model file {path} is truncated: {size} bytes, no "
                                 "safetensors header")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _SAFETENSORS_MAX_HEADER):
            raise LangpruneError(
                f"model file {path} is truncated or not a safetensors file: its header "
                f"claims {n:,} bytes, the file has {size:,}")
        try:
            header = json.loads(f.read(n))
            end = max((int(t["data_offsets"][1]) for k, t in header.items()
                       if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise LangpruneError(
                f"model file {path} is not a safetensors file: its header is not a "
                "tensor table") from None
    if size < 8 + n + end:
        raise LangpruneError(
            f"model file {path} is truncated: {size:,} bytes, its header needs "
            f"{8 + n + end:,}; download or convert it again")


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
