"""Model sources behind load_model: local folder, hub (local stand-ins), GGUF cache logic."""

from __future__ import annotations

import json
import socket
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, ByT5Tokenizer

from pipeline import loading as L
from pipeline import model_cache as MC
from pipeline import model_files as MF
from pipeline.config import ModelCfg
from pipeline.errors import LangpruneError
from tests.tiny import tiny_model


def cfg(model: str, **kw) -> ModelCfg:
    return ModelCfg(model=model, device="cpu", **kw)


# ---- local folders and paths ----------------------------------------------------------------


def test_local_folder_loads_with_config_dtype(tiny_model_dir):
    loaded = L.load_model(cfg(str(tiny_model_dir), dtype="bfloat16"))
    assert loaded.kind == "local"
    assert loaded.dtype == torch.bfloat16
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert loaded.device == torch.device("cpu")
    assert loaded.max_length == 512
    assert loaded.n_params == sum(p.numel() for p in loaded.model.parameters()) > 0
    assert not loaded.model.training
    assert loaded.tokenizer("hi", add_special_tokens=False)["input_ids"] == [107, 108]


@pytest.mark.parametrize("name", ["./no/such/folder", "/no/such/folder", "a/b/c", "gone.gguf"])
def test_missing_local_path_is_a_clear_error(name, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LangpruneError, match="does not exist"):
        L.load_model(cfg(name))


def test_folder_without_config_is_rejected(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(LangpruneError, match="no config.json"):
        L.load_model(cfg(str(tmp_path)))


def test_unavailable_cuda_is_a_clear_error(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LangpruneError, match="CUDA is not available"):
        L.load_model(ModelCfg(model=str(tiny_model_dir), device="cuda"))


# ---- hub ids, with a local hub cache standing in for the hub -------------------------------


@pytest.fixture
def hub_cache(tmp_path, tiny_model_dir, monkeypatch):
    """A Hugging Face hub cache holding ``org/tiny`` (the standard snapshot layout)."""
    from huggingface_hub import constants

    root = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = root / "models--org--tiny"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in tiny_model_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    return root


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def unreachable_hub(monkeypatch):
    """No offline flag, but the hub endpoint is a closed local port (connection refused)."""
    from huggingface_hub import constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")


def test_hub_id_loads_from_the_local_cache_when_offline(hub_cache, offline):
    loaded = L.load_model(cfg("org/tiny"))
    assert loaded.kind == "hub"
    assert "local hub cache only" in loaded.source
    assert str(hub_cache) in loaded.source  # loaded from the snapshot folder, no hub call
    assert loaded.max_length == 512


def test_hub_id_missing_offline_fails_fast(hub_cache, offline):
    t0 = time.perf_counter()
    with pytest.raises(LangpruneError, match="neither a local folder nor in the local Hugging "
                                             "Face cache.*HF_HUB_OFFLINE"):
        L.load_model(cfg("org/absent"))
    assert time.perf_counter() - t0 < 10


def test_unreachable_hub_fails_fast_without_offline_flag(hub_cache, unreachable_hub):
    assert not L.hub_online()
    t0 = time.perf_counter()
    with pytest.raises(LangpruneError, match="cannot connect to 127.0.0.1"):
        L.load_model(cfg("org/absent"))
    assert time.perf_counter() - t0 < 10
    # ... while a cached model still loads.
    assert L.load_model(cfg("org/tiny")).kind == "hub"


def test_reachable_endpoint_is_seen_as_online(monkeypatch, unreachable_hub):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert L.hub_online()


def test_embedded_alias_typo_suggests_the_alias(offline):
    with pytest.raises(LangpruneError, match="did you mean gemma-3-270m"):
        L.load_model(cfg("gemma-3-270"))


@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_follows_the_config(hub_cache, offline, monkeypatch, trust):
    seen: list[dict] = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        original = cls.from_pretrained

        def spy(source, *args, _orig=original, **kwargs):
            seen.append(dict(kwargs))
            kwargs["trust_remote_code"] = False  # the stand-in has no remote code
            return _orig(source, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    L.load_model(cfg("org/tiny", trust_remote_code=trust))
    assert len(seen) == 2
    assert all(kw["trust_remote_code"] is trust and kw["local_files_only"] for kw in seen)


# ---- GGUF conversion cache (a tiny model stands in for the dequantised GGUF) ----------------


@pytest.fixture
def fake_reader(monkeypatch):
    """Replace the GGUF reader: a tiny Llama marked as GGUF-quantised, as transformers does."""
    calls: list[Path] = []

    def read(gguf: Path):
        calls.append(gguf)
        model = tiny_model("llama")
        model.config.quantization_config = {"quant_method": "gguf", "gguf_file": gguf.name}
        model.hf_quantizer = object()
        return model, ByT5Tokenizer()

    monkeypatch.setattr(MC, "read_gguf", read)
    return calls


def gguf_file(folder: Path, content: bytes = b"GGUF-fake-1") -> Path:
    path = folder / "model.gguf"
    path.write_bytes(content)
    return path


def test_gguf_is_converted_once_then_loaded_from_the_cache(tmp_path, fake_reader):
    path = gguf_file(tmp_path)
    cache = tmp_path / "cache"
    first = L.load_model(cfg(str(path), model_cache=str(cache)))
    second = L.load_model(cfg(str(path), model_cache=str(cache)))
    assert len(fake_reader) == 1
    assert first.kind == second.kind == "gguf"
    (entry,) = (cache / "models").iterdir()
    sha = MF.file_sha256(path)
    assert entry.name == f"model-{sha[:16]}"
    marker = json.loads((entry / MC.CACHE_MARKER).read_text())
    assert marker["sha256"] == sha and marker["dtype"] == "float32"
    assert "quantization_config" not in json.loads((entry / "config.json").read_text())
    for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_changed_gguf_content_gets_a_new_cache_entry(tmp_path, fake_reader):
    cache = tmp_path / "cache"
    L.load_model(cfg(str(gguf_file(tmp_path, b"one")), model_cache=str(cache)))
    L.load_model(cfg(str(gguf_file(tmp_path, b"two")), model_cache=str(cache)))
    assert len(fake_reader) == 2
    assert len(list((cache / "models").iterdir())) == 2


def test_interrupted_conversion_leaves_no_half_cache(tmp_path, fake_reader, monkeypatch):
    path = gguf_file(tmp_path)
    cache = tmp_path / "cache"
    original = MC._save_dequantised

    def save_then_die(model, tokenizer, folder):
        original(model, tokenizer, folder)  # weights written, marker not yet
        raise KeyboardInterrupt

    monkeypatch.setattr(MC, "_save_dequantised", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        L.load_model(cfg(str(path), model_cache=str(cache)))
    assert list((cache / "models").iterdir()) == []  # neither the entry nor a temp folder
    monkeypatch.setattr(MC, "_save_dequantised", original)
    assert L.load_model(cfg(str(path), model_cache=str(cache))).kind == "gguf"
    assert len(fake_reader) == 2


def test_incomplete_cache_entry_is_replaced(tmp_path, fake_reader):
    path = gguf_file(tmp_path)
    cache = tmp_path / "cache"
    stale = cache / "models" / f"model-{MF.file_sha256(path)[:16]}"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{broken")
    L.load_model(cfg(str(path), model_cache=str(cache)))
    assert L.is_complete(stale) and len(fake_reader) == 1


def test_embedded_package_is_keyed_on_its_declared_checksum(tmp_path, fake_reader, monkeypatch):
    assembled: list[Path] = []
    pkg = types.ModuleType("fake_gguf_pkg")
    pkg.EXPECTED_SHA256 = "ab" * 32
    pkg.MODEL_NAME = "fake.gguf"

    def assemble(output_path):
        Path(output_path).parent.mkdir(parents=True, exist_ok=True)
        Path(output_path).write_bytes(b"GGUF")
        assembled.append(Path(output_path))
        return output_path

    pkg.assemble = assemble
    monkeypatch.setitem(sys.modules, "fake_gguf_pkg", pkg)
    spec = MC.EmbeddedModel("fake-1m", "fake_gguf_pkg", "fake-gguf-pkg", "a test model")
    folder, sha = MC.embedded_folder(spec, tmp_path)
    again, _ = MC.embedded_folder(spec, tmp_path)
    assert folder == again == tmp_path / "models" / f"fake-1m-{'ab' * 8}"
    assert sha == "ab" * 32
    assert len(assembled) == len(fake_reader) == 1  # the second call neither assembles nor converts
    assert not assembled[0].exists()  # the GGUF copy is dropped once converted


def test_missing_embedded_package_names_the_install(tmp_path):
    spec = MC.EmbeddedModel("nope", "no_such_module_xyz", "no-such-pkg", "")
    with pytest.raises(LangpruneError, match="needs the package no-such-pkg"):
        MC.embedded_folder(spec, tmp_path)


def test_default_alias_is_registered():
    from pipeline.config import DEFAULT_MODEL

    assert DEFAULT_MODEL in L.EMBEDDED


# ---- the real embedded default (slow: conversion about a minute on first use) ---------------

REFERENCE_BPB = {"ar": 0.92, "de": 1.12, "en": 1.02, "es": 1.08, "ru": 0.68, "sw": 1.85, "zh": 1.44}


@pytest.mark.slow
def test_default_model_loads_offline_and_matches_reference_bpb(monkeypatch):
    """The issue's figures: bits per byte on the first 30 FLORES-200 devtest sentences.

    They are reproduced by the project's definition itself (sentences joined by newlines,
    512-token windows starting with BOS): measured deviations are within -8 %..+4 %. Scoring
    each sentence separately does not reproduce them (Swahili is 20 % off).
    """
    from pipeline.data.sources import load_eval_sentences
    from pipeline.evaluate.perplexity import evaluate_perplexity

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = L.load_model(ModelCfg(device="cpu"))
    assert loaded.kind == "embedded"
    assert type(loaded.model).__name__ == "Gemma3ForCausalLM"
    assert loaded.n_params == 268_098_176
    for lang, ref in REFERENCE_BPB.items():
        res = evaluate_perplexity(loaded.model, loaded.tokenizer,
                                  load_eval_sentences("flores", lang)[:30], seq_len=512,
                                  batch_size=4, progress=False)
        assert res.bpb == pytest.approx(ref, rel=0.10), lang
