"""Bit-packed storage of pruning masks (1 bit per weight) with a checksum; never pickles.

File format: one safetensors file. Each module name maps to a 1-D uint8 tensor holding
``np.packbits(mask.flatten(), bitorder="little")`` (True = pruned). The safetensors metadata
holds ``format``, ``version``, ``bitorder``, the JSON ``shapes`` of every mask and the
``sha256`` of the payload (names, shapes and bits, in sorted name order), plus any caller
metadata. Files are written to a temporary name and renamed, so a crash never leaves a
partial file under the final name. The temporary name records the writer's host and pid
(``.masks.safetensors~host~pid~XXXX.tmp``), so a file left by a killed writer is recognised
and removed by :func:`remove_stale_temporaries` on the next start.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from torch import Tensor, nn

from pipeline.errors import LangpruneError

FORMAT = "langprune-masks"
VERSION = "1"
_RESERVED = ("format", "version", "bitorder", "shapes", "sha256")
_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)  # little bit order: element k -> bit k


@dataclass(frozen=True, eq=False)  # numpy arrays have no boolean ==
class PackedMask:
    """A bool mask packed 8 entries per byte (``np.packbits(..., bitorder="little")``).

    Attributes:
        bits: uint8 array of ``ceil(numel / 8)`` bytes; padding bits are 0.
        shape: Shape of the unpacked mask.
    """

    bits: np.ndarray
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Number of mask entries."""
        return int(np.prod(self.shape, dtype=np.int64))

    def count(self) -> int:
        """Number of True (pruned) entries, by popcount without unpacking."""
        return int(np.bitwise_count(self.bits).sum(dtype=np.int64))

    def unpack(self) -> Tensor:
        """The bool mask as a CPU tensor of :attr:`shape`."""
        flat = np.unpackbits(self.bits, count=self.numel, bitorder="little").astype(bool)
        return torch.from_numpy(flat.reshape(self.shape))


def pack_mask(mask: Tensor) -> PackedMask:
    """Pack a bool tensor (any device) into a :class:`PackedMask`.

    On an accelerator the packing runs on the mask's device, so only 1/8 of the data crosses
    to the CPU; on the CPU numpy's ``packbits`` does it (~50x faster than the tensor path).
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool, got {mask.dtype}")
    flat = mask.detach().reshape(-1)
    shape = tuple(int(s) for s in mask.shape)
    if flat.device.type == "cpu":
        return PackedMask(np.packbits(flat.numpy(), bitorder="little"), shape)
    return PackedMask(pack_bits_on_device(flat).cpu().numpy(), shape)


def pack_bits_on_device(flat: Tensor) -> Tensor:
    """Little-order bit packing of a flat bool tensor with tensor ops (runs on any device)."""
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=flat.device)
    # Summing distinct powers of two is a bitwise OR; int32 accumulation is supported everywhere.
    packed = (flat.view(-1, 8).to(torch.uint8) * weights).sum(dim=1, dtype=torch.int32)
    return packed.to(torch.uint8)


def _as_packed(mask: Tensor | PackedMask) -> PackedMask:
    return mask if isinstance(mask, PackedMask) else pack_mask(mask)


def _payload_sha256(packed: Mapping[str, PackedMask]) -> str:
    digest = hashlib.sha256()
    for name in sorted(packed):
        digest.update(name.encode("utf-8") + b"\0")
        digest.update(json.dumps(list(packed[name].shape)).encode() + b"\0")
        digest.update(np.ascontiguousarray(packed[name].bits, dtype=np.uint8).tobytes())
    return digest.hexdigest()


def masks_sha256(masks: Mapping[str, Tensor | PackedMask]) -> str:
    """The payload sha256 :func:`save_masks` would store (and return) for ``masks``."""
    return _payload_sha256({name: _as_packed(m) for name, m in masks.items()})


def save_masks(
    masks: Mapping[str, Tensor | PackedMask],
    path: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
) -> str:
    """Write ``masks`` (module name -> bool tensor or :class:`PackedMask`) to ``path``.

    Args:
        masks: Masks by full module name (e.g. ``model.layers.0.mlp.up_proj``); True = pruned.
        path: Target ``.safetensors`` file; its folder must exist.
        metadata: Extra string metadata stored in the file (keys other than the reserved
            ``format``, ``version``, ``bitorder``, ``shapes``, ``sha256``).

    Returns:
        The sha256 hex digest of the payload (also stored in the file).
    """
    extra = dict(metadata or {})
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise LangpruneError(f"mask metadata keys {clash} are reserved")
    packed = {name: _as_packed(m) for name, m in masks.items()}
    checksum = _payload_sha256(packed)
    meta = {
        **{str(k): str(v) for k, v in extra.items()},
        "format": FORMAT,
        "version": VERSION,
        "bitorder": "little",
        "shapes": json.dumps({k: list(v.shape) for k, v in sorted(packed.items())}),
        "sha256": checksum,
    }
    target = Path(path)
    if not target.parent.is_dir():
        raise LangpruneError(f"cannot write masks to {target}: folder does not exist")
    tmp = ""
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target.name), suffix=".tmp",
                                   dir=target.parent)
        os.close(fd)
        save_file({k: np.ascontiguousarray(v.bits) for k, v in packed.items()}, tmp, metadata=meta)
        os.replace(tmp, target)
    except OSError as e:  # disk full, read-only or vanished folder: one clear line
        raise LangpruneError(f"cannot write masks to {target}: {e.strerror or e}") from None
    finally:  # also on SIGINT/SIGTERM: never leave a partial file behind
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
    return checksum


_TEMP_NAME = re.compile(r"^\.(?P<name>.+)~(?P<host>[^~/]+)~(?P<pid>\d+)~[^/]*\.tmp$")


def _temp_prefix(name: str) -> str:
    return f".{name}~{socket.gethostname()}~{os.getpid()}~"


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove temporary mask files left under ``folder`` (and its run sub-folders) by writers
    on this host that no longer run (killed mid-write); returns the removed paths.

    Files of live writers, and of other hosts (an output folder on shared storage), are kept.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    host, removed = socket.gethostname(), []
    for path in [*root.glob(".*.tmp"), *root.glob("*/.*.tmp")]:
        m = _TEMP_NAME.match(path.name)
        if m is None or m["host"] != host or _process_exists(int(m["pid"])):
            continue
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:  # removed concurrently by another starting worker
            pass
    return removed


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata stored in a mask file (including ``sha256`` and caller metadata)."""
    try:
        with safe_open(str(path), framework="np") as f:
            return dict(f.metadata() or {})
    except FileNotFoundError:
        raise LangpruneError(f"mask file {path} does not exist") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise LangpruneError(f"mask file {path} is corrupt or not a mask file: {e}") from None


def load_packed(path: str | os.PathLike[str]) -> dict[str, PackedMask]:
    """Load masks without unpacking them, verifying the format and the checksum.

    Raises:
        LangpruneError: if the file is missing, not a mask file, or fails its checksum.
    """
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise LangpruneError(f"{path} is not a langprune mask file")
    try:
        shapes = json.loads(meta["shapes"])
        with safe_open(str(path), framework="np") as f:
            packed = {
                name: PackedMask(f.get_tensor(name), tuple(shapes[name])) for name in f.keys()
            }
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise LangpruneError(f"mask file {path} is corrupt: {e}") from None
    if set(packed) != set(shapes):
        raise LangpruneError(f"mask file {path} is corrupt: names do not match its metadata")
    for name, pm in packed.items():
        if pm.bits.dtype != np.uint8 or pm.bits.size != (pm.numel + 7) // 8:
            raise LangpruneError(f"mask file {path} is corrupt: bad size for {name}")
    if _payload_sha256(packed) != meta.get("sha256"):
        raise LangpruneError(f"mask file {path} failed its sha256 check (corrupted or edited)")
    return packed


def load_masks(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Load masks as bool CPU tensors (True = pruned), verifying the checksum."""
    return {name: pm.unpack() for name, pm in load_packed(path).items()}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, Tensor | PackedMask]) -> None:
    """Zero the masked weights of ``model`` in place (re-creates a magnitude/Wanda model exactly).

    SparseGPT also updates the kept weights, so re-applying its mask to a dense model gives
    the same sparsity pattern but not the same weights.

    Raises:
        LangpruneError: if a name is not a module with a weight of the mask's shape.
    """
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        weight = getattr(modules.get(name), "weight", None)
        if not isinstance(weight, Tensor):
            raise LangpruneError(f"mask {name!r} names no module with a weight in this model")
        shape = mask.shape if isinstance(mask, PackedMask) else tuple(mask.shape)
        if tuple(weight.shape) != tuple(shape):
            raise LangpruneError(
                f"mask {name!r} has shape {tuple(shape)}, weight has {tuple(weight.shape)}"
            )
    for name, mask in masks.items():
        dense = mask.unpack() if isinstance(mask, PackedMask) else mask
        weight = modules[name].weight
        weight.masked_fill_(dense.to(weight.device, torch.bool), 0)
