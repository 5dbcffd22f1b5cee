"""Load a causal LM and its tokenizer from any model source, behind one function.

``load_model(cfg.model)`` accepts, in this order of precedence:

1. an **embedded alias** (``gemma-3-270m``, the default): a GGUF file shipped as a Python
   package, dequantised once into a cached Hugging Face folder (fp32 safetensors) under
   :func:`pipeline.paths.cache_dir`; later loads read that folder in seconds;
2. a **.gguf file**: converted and cached the same way, keyed on the file's SHA-256;
3. a **local Hugging Face folder** (one with ``config.json``);
4. a **hub id** (``org/name``): ``from_pretrained`` from the Hugging Face hub. When the hub is
   offline (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``) or unreachable (a TCP probe with a
   short timeout), only the local hub cache is used, so a missing model fails in seconds with
   a :class:`LangpruneError` instead of minutes of retries.

The embedded models and the GGUF conversion cache live in :mod:`pipeline.model_cache`, the
cheap checks of model files in :mod:`pipeline.model_files`, hub reachability in
:mod:`pipeline.hub`.
"""

from __future__ import annotations

import importlib
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.config import ModelCfg
from pipeline.errors import LangpruneError
from pipeline.hub import _offline_reason, hub_online
from pipeline.model_cache import EMBEDDED, _cache_entry, convert_gguf, embedded_folder, is_complete
from pipeline.model_files import check_gguf_header, check_weight_files, file_sha256
from pipeline.models import model_max_length, resolve_device, resolve_dtype
from pipeline.paths import cache_dir
from pipeline.registry import suggest

log = logging.getLogger(__name__)

# A hub id is "name" or "org/name" of letters, digits, '-', '_', '.'.
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


@dataclass
class LoadedModel:
    """A model ready for pruning and evaluation.

    Attributes:
        model: The causal LM in eval mode, on ``device`` (on the CPU when offloading).
        tokenizer: Its tokenizer.
        source: Human-readable description of where it came from (logged as a tag).
        kind: ``embedded``, ``gguf``, ``local`` or ``hub``.
        device: The compute device resolved from the config.
        dtype: The weight dtype resolved from the config.
        max_length: Longest sequence the model config allows (None if it does not say).
        n_params: Number of distinct parameters (tied weights counted once).
        load_s: Wall time of the load, conversion included.
    """

    model: Any
    tokenizer: Any
    source: str
    kind: str
    device: torch.device
    dtype: torch.dtype
    max_length: int | None
    n_params: int
    load_s: float


def load_model(cfg: ModelCfg, tokenizer: Any = None) -> LoadedModel:
    """Load the model and tokenizer named by ``cfg.model`` (see the module docstring).

    Args:
        cfg: The model section of the config (model, device, dtype, offload,
            trust_remote_code, model_cache).
        tokenizer: The tokenizer :func:`probe_model` already loaded from the same source
            (None: load it here). Reusing it also reuses its cached calibration tokens.

    Returns:
        The loaded model, tokenizer and facts about them.

    Raises:
        LangpruneError: missing path, unreachable hub without a cached copy, a missing
            embedded package, or an unavailable device; raised before any heavy work.
    """
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype)
    kind, folder, source, local_only = _resolve_source(cfg)
    model, tokenizer = _from_pretrained(
        folder, dtype=dtype, local_files_only=local_only, trust_remote_code=cfg.trust_remote_code,
        tokenizer=tokenizer,
    )
    model.eval()
    if not cfg.offload:  # offloading keeps weights on the CPU; the engine moves layers
        model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source=source,
        kind=kind,
        device=device,
        dtype=dtype,
        max_length=model_max_length(model),
        n_params=n_params,
        load_s=time.perf_counter() - t0,
    )
    log.info("loaded %s: %.1f M parameters, %s on %s in %.1f s",
             source, n_params / 1e6, cfg.dtype, device, loaded.load_s)
    return loaded


@dataclass(frozen=True)
class ModelProbe:
    """What a model source promises, read without loading its weights.

    Attributes:
        folder: The local Hugging Face folder that :func:`load_model` will read.
        tokenizer: Its tokenizer (corpus checks need it before the model is loaded).
        max_length: Longest sequence its config allows (None if it does not say).
        n_layers: Number of decoder layers found.
        weight_shapes: Shape of every module weight, by module name (read off the skeleton),
            so mask files can be checked against the model before it is loaded.
    """

    folder: str
    tokenizer: Any = field(repr=False)
    max_length: int | None = None
    n_layers: int = 0
    weight_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)


def probe_model(cfg: ModelCfg) -> ModelProbe | None:
    """Cheap checks of ``cfg.model`` and ``cfg.device`` before any weights are read.

    Resolves the source as :func:`load_model` does, but never converts or downloads: an
    unavailable device, a missing path, a folder without ``config.json``, a ``.gguf`` file
    without the GGUF magic (:func:`~pipeline.model_files.check_gguf_header`), a truncated
    or foreign ``.safetensors`` file or a missing shard
    (:func:`~pipeline.model_files.check_weight_files`), an unknown architecture or a model
    without decoder layers fail here with one line naming the file. The model is built on
    the meta device (no memory, no weights) to find its decoder layers.

    Nothing is cached: a job probes once (in its preflight), keeps the probe and hands its
    tokenizer to :func:`load_model`.

    Returns:
        The probe, or None when the source is not a local folder yet (an embedded model
        before its first conversion, a GGUF file, a model on a reachable hub): the rest of
        those is checked while loading.

    Raises:
        LangpruneError: one of the problems above.
    """
    resolve_device(cfg.device)
    folder = _local_folder(cfg)
    if folder is None:
        return None
    check_weight_files(Path(folder))
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"local_files_only": True, "trust_remote_code": cfg.trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(folder, **kwargs)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(
                config, trust_remote_code=cfg.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:  # missing/foreign files, unknown type
        if isinstance(e, ValueError) and "trust_remote_code" in str(e):
            raise _remote_code_refused(folder) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LangpruneError(f"cannot load model {cfg.model!r}: {first}") from None
    from pipeline.models import find_decoder_layers

    _, layers = find_decoder_layers(skeleton)
    shapes = {name: tuple(m.weight.shape) for name, m in skeleton.named_modules()
              if isinstance(getattr(m, "weight", None), torch.Tensor)}
    return ModelProbe(folder, tokenizer, model_max_length(skeleton), len(layers), shapes)


def _local_folder(cfg: ModelCfg) -> str | None:
    """The local folder :func:`_resolve_source` would load, if it exists without heavy work."""
    name = cfg.model
    if name in EMBEDDED:
        spec = EMBEDDED[name]
        try:
            sha = str(importlib.import_module(spec.package).EXPECTED_SHA256)
        except ImportError:
            raise LangpruneError(
                f"the embedded model {spec.alias} needs the package {spec.pip_name}; install "
                f"the project with `pip install -e .` (see README)"
            ) from None
        target = _cache_entry(cache_dir(cfg.model_cache), spec.alias, sha)
        return str(target) if is_complete(target) else None
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise LangpruneError(f"model file {name} does not exist")
        check_gguf_header(path)
        return None
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LangpruneError(
                f"model folder {name} has no config.json: not a Hugging Face model folder"
            )
        return str(path)
    if _looks_like_path(name) or not _HUB_ID.match(name):
        raise LangpruneError(f"model path {name} does not exist{suggest(name, list(EMBEDDED))}")
    if hub_online():
        return None
    return str(cached_snapshot(name))


def _resolve_source(cfg: ModelCfg) -> tuple[str, str, str, bool]:
    """Decide the source kind; returns ``(kind, folder_or_id, description, local_only)``.

    Conversion of GGUF sources happens here, so the caller always loads an HF folder/id.
    """
    name = cfg.model
    if name in EMBEDDED:
        spec = EMBEDDED[name]
        folder, sha = embedded_folder(spec, cache_dir(cfg.model_cache))
        return "embedded", str(folder), f"{name} ({spec.description}; sha256 {sha[:12]})", True
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise LangpruneError(f"model file {name} does not exist")
        folder = convert_gguf(path, file_sha256(path), cache_dir(cfg.model_cache))
        return "gguf", str(folder), f"{path} (GGUF, converted at {folder})", True
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LangpruneError(
                f"model folder {name} has no config.json: not a Hugging Face model folder"
            )
        return "local", str(path), f"{path.resolve()} (local folder)", True
    if _looks_like_path(name) or not _HUB_ID.match(name):
        raise LangpruneError(f"model path {name} does not exist{suggest(name, list(EMBEDDED))}")
    if hub_online():
        return "hub", name, f"{name} (Hugging Face hub)", False
    snapshot = cached_snapshot(name)
    return "hub", str(snapshot), f"{name} (Hugging Face local hub cache only: {snapshot})", True


def cached_snapshot(repo_id: str) -> Path:
    """The folder of ``repo_id`` in the local hub cache (no network), or a LangpruneError.

    Loading that folder as a local path keeps transformers off the network entirely (with
    a hub id, its adapter lookup ignores ``local_files_only`` and retries for ~25 s).
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        # The cache folder is read at call time, so a changed HF_HUB_CACHE is honoured.
        return Path(snapshot_download(repo_id, local_files_only=True,
                                      cache_dir=constants.HF_HUB_CACHE))
    except (LocalEntryNotFoundError, FileNotFoundError):
        raise LangpruneError(
            f"model {repo_id!r} is neither a local folder nor in the local Hugging Face cache, "
            f"and the hub is offline or unreachable ({_offline_reason()}); download it where "
            f"the hub is reachable, or name a local folder{suggest(repo_id, list(EMBEDDED))}"
        ) from None


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1


def _from_pretrained(
    source: str, *, dtype: torch.dtype, local_files_only: bool, trust_remote_code: bool,
    tokenizer: Any = None,
) -> tuple[Any, Any]:
    """``AutoTokenizer``/``AutoModelForCausalLM.from_pretrained`` with one-line errors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"local_files_only": local_files_only, "trust_remote_code": trust_remote_code}
    try:
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as e:  # transformers reports missing files/repos and network errors so
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LangpruneError(f"cannot load model {source!r}: {first}") from None
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise _remote_code_refused(source) from None
    return model, tokenizer


def _remote_code_refused(source: str) -> LangpruneError:
    return LangpruneError(
        f"model {source!r} ships its own Python code, which langprune does not run unless "
        "you set trust_remote_code=true (only for code you have read and trust)")
