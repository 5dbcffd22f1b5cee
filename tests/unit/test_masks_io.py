"""Bit-packed mask files: exact round trip, <= 1 bit per weight, checksums, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline.masks as masks_mod
from pipeline.errors import LangpruneError
from pipeline.masks import (
    PackedMask,
    apply_masks,
    load_masks,
    load_packed,
    pack_bits_on_device,
    pack_mask,
    read_metadata,
    save_masks,
)
from pipeline.pruners import SparsityTarget
from tests.tiny import prune_layerwise, tiny_model, tiny_windows


def _random_masks(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"a.q_proj": (16, 8), "a.odd": (3, 7), "b.down_proj": (5, 13), "b.one": (1, 1)}
    return {k: torch.rand(s, generator=gen) < 0.5 for k, s in shapes.items()}


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 7), (16, 8)])
def test_pack_mask_is_numpy_packbits_little(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(1)) < 0.4
    packed = pack_mask(mask)
    expected = np.packbits(mask.numpy().reshape(-1), bitorder="little")
    assert packed.bits.dtype == np.uint8 and np.array_equal(packed.bits, expected)
    assert packed.shape == shape and packed.count() == int(mask.sum())
    assert torch.equal(packed.unpack(), mask)
    # the tensor-op packing used on accelerators gives the same bytes
    assert np.array_equal(pack_bits_on_device(mask.reshape(-1)).numpy(), expected)


def test_round_trip_is_exact_and_checksummed(tmp_path):
    masks = _random_masks()
    path = tmp_path / "m.safetensors"
    sha = save_masks(masks, path, metadata={"config_hash": "abc"})
    meta = read_metadata(path)
    assert meta["sha256"] == sha and meta["config_hash"] == "abc"
    loaded = load_masks(path)
    assert set(loaded) == set(masks)
    for name, mask in masks.items():
        assert loaded[name].dtype == torch.bool and torch.equal(loaded[name], mask)
    packed = load_packed(path)
    assert all(isinstance(p, PackedMask) for p in packed.values())
    assert packed["a.odd"].count() == int(masks["a.odd"].sum())
    # Same content -> same checksum, whether given as bool tensors or already packed.
    assert save_masks({k: pack_mask(v) for k, v in masks.items()}, tmp_path / "n.safetensors",
                      metadata={"config_hash": "abc"}) == sha


def test_storage_is_at_most_one_bit_per_weight(tmp_path):
    mask = torch.rand(512, 512, generator=torch.Generator().manual_seed(2)) < 0.5
    path = tmp_path / "big.safetensors"
    save_masks({"w": mask}, path)
    header_allowance = 4096
    assert path.stat().st_size <= mask.numel() / 8 + header_allowance


def _flip_payload_byte(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # the payload sits at the end of a safetensors file
    path.write_bytes(bytes(data))


def test_corruption_is_detected(tmp_path):
    path = tmp_path / "m.safetensors"
    save_masks(_random_masks(), path)
    _flip_payload_byte(path)
    with pytest.raises(LangpruneError, match="sha256"):
        load_masks(path)
    truncated = tmp_path / "t.safetensors"
    save_masks(_random_masks(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:-10])
    with pytest.raises(LangpruneError, match="corrupt"):
        load_masks(truncated)
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(LangpruneError):
        load_packed(garbage)
    with pytest.raises(LangpruneError, match="does not exist"):
        load_packed(tmp_path / "missing.safetensors")


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(masks_mod, "save_file", boom)
    with pytest.raises(LangpruneError, match="cannot write masks to .*: disk full"):
        save_masks(_random_masks(), tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_bad_metadata_and_folder_are_errors(tmp_path):
    with pytest.raises(LangpruneError, match="reserved"):
        save_masks(_random_masks(), tmp_path / "m.safetensors", metadata={"sha256": "x"})
    with pytest.raises(LangpruneError, match="folder"):
        save_masks(_random_masks(), tmp_path / "no" / "m.safetensors")


def test_apply_masks_recreates_a_pruned_model_exactly(tmp_path):
    pruned = tiny_model("llama")
    result = prune_layerwise(pruned, tiny_windows(4), "wanda", SparsityTarget(0.5),
                             device="cpu", batch_size=2, progress=False)
    path = tmp_path / "m.safetensors"
    save_masks(result.masks, path)
    dense = tiny_model("llama")
    apply_masks(dense, load_masks(path))
    for (name, a), (_, b) in zip(dense.named_parameters(), pruned.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    packed_copy = tiny_model("llama")
    apply_masks(packed_copy, load_packed(path))  # packed masks work too
    assert torch.equal(packed_copy.model.layers[1].mlp.up_proj.weight,
                       pruned.model.layers[1].mlp.up_proj.weight)


def test_apply_masks_rejects_unknown_names_and_wrong_shapes():
    model = tiny_model("llama")
    with pytest.raises(LangpruneError, match="names no module"):
        apply_masks(model, {"model.layers.9.mlp.up_proj": torch.zeros(128, 64, dtype=torch.bool)})
    with pytest.raises(LangpruneError, match="shape"):
        apply_masks(model, {"model.layers.0.mlp.up_proj": torch.zeros(64, 64, dtype=torch.bool)})
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    good = torch.ones(128, 64, dtype=torch.bool)
    with pytest.raises(LangpruneError):  # checked before anything is modified
        apply_masks(model, {"model.layers.0.mlp.up_proj": good, "nope": good})
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, before)


def test_partial_files_of_dead_writers_on_this_host_are_removed(tmp_path):
    import socket
    import subprocess
    import sys

    from pipeline.masks import remove_stale_temporaries

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)  # a process that has exited
    host = socket.gethostname()
    run = tmp_path / "run1"
    run.mkdir()
    stale = run / f".masks.safetensors~{host}~{dead_pid}~ab12.tmp"
    live = run / f".masks.safetensors~{host}~{os.getpid()}~cd34.tmp"  # a writer still at work
    other_host = run / f".masks.safetensors~elsewhere.example~{dead_pid}~ef56.tmp"
    final = run / "masks.safetensors"
    for p in (stale, live, other_host, final):
        p.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert sorted(p.name for p in run.iterdir()) == sorted(
        p.name for p in (live, other_host, final))
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_the_temporary_name_is_recognised_as_this_writers(tmp_path, monkeypatch):
    """save_masks' own temporary name is one that the sweep parses (and keeps while alive)."""
    from pipeline import masks as M

    seen = []
    real = M.save_file

    def spy(tensors, path, metadata=None):
        seen.append(Path(path).name)
        assert M.remove_stale_temporaries(tmp_path) == []  # our own, alive: kept
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(M, "save_file", spy)
    save_masks(_random_masks(), tmp_path / "masks.safetensors")
    [name] = seen
    m = M._TEMP_NAME.match(name)
    assert m is not None and int(m["pid"]) == os.getpid() and m["name"] == "masks.safetensors"
