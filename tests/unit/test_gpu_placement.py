"""The CUDA code paths, checked on CPU: device and dtype resolution with CUDA present or absent
(``torch.cuda`` monkeypatched), what offloading puts on the compute device (the ``meta``
device stands in for CUDA: parameters there have a real device but no data), and where
calibration statistics live. Tests that need a real GPU are marked ``gpu``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pipeline.engine.groups as groups_mod
import pipeline.engine.inputs as inputs_mod
import pipeline.engine.prune as prune_mod
import pipeline.models as models_mod
from pipeline.config import ModelCfg
from pipeline.engine.inputs import _embedding_placement
from pipeline.engine.prune import _make_stats, _Run
from pipeline.errors import LangpruneError
from pipeline.models import decoder_layers, find_linears, onloaded, resolve_device, resolve_dtype
from pipeline.pruners import ColumnSquares, Hessian, SparsityTarget, make_pruner
from tests.tiny import prune_layerwise, tiny_model, tiny_windows

META = torch.device("meta")
HALF = SparsityTarget(0.5)


@pytest.fixture
def two_gpus(monkeypatch):
    """Pretend CUDA is present with two devices (nothing is allocated on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


# ---- device and dtype resolution -------------------------------------------------------------


def test_auto_picks_cuda_when_present_and_indices_are_checked(two_gpus):
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(LangpruneError, match="only 2 CUDA device"):
        resolve_device("cuda:2")
    assert resolve_device("cpu") == torch.device("cpu")  # an explicit cpu is never overridden


def test_without_cuda_auto_is_cpu_and_cuda_is_an_error_not_a_fallback(no_gpu):
    assert resolve_device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(LangpruneError, match="CUDA is not available"):
            resolve_device(name)


def test_config_accepts_cuda_indices_and_gpu_dtypes():
    assert ModelCfg(device="cuda:3").device == "cuda:3"  # checked against hardware at load
    with pytest.raises(LangpruneError, match="unknown device"):
        ModelCfg(device="gpu")
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16
    assert resolve_dtype("float32") is torch.float32


# ---- what offloading puts where ----------------------------------------------------------------


def _devices(module: torch.nn.Module) -> set[str]:
    return {t.device.type for t in (*module.parameters(), *module.buffers())}


def _one_way_to_meta(monkeypatch):
    """Let move_tensors move to meta (the stand-in device) but not back (meta has no data)."""
    real = models_mod.move_tensors

    def move(module, device, skip=()):
        if device == META:
            real(module, device, skip)

    monkeypatch.setattr(models_mod, "move_tensors", move)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_offload_puts_embedding_pass_on_device_and_keeps_layers_home(monkeypatch, family):
    model = tiny_model(family)
    layers = decoder_layers(model)
    _one_way_to_meta(monkeypatch)
    with _embedding_placement(model, layers, META, offload=True):
        assert _devices(model.model.embed_tokens) == {"meta"}
        assert _devices(model.model.rotary_emb) <= {"meta"}
        assert _devices(model.model.norm) == {"meta"}
        assert all(_devices(layer) == {"cpu"} for layer in layers)
        if family == "llama":  # untied lm_head: calibration never runs it, so it stays home
            assert _devices(model.lm_head) == {"cpu"}
        else:  # tied: the one weight went with the embeddings, and is still tied
            assert model.lm_head.weight is model.model.embed_tokens.weight


def test_without_offload_nothing_moves_in_the_embedding_pass(monkeypatch):
    model = tiny_model("llama")
    calls = []
    monkeypatch.setattr(models_mod, "move_tensors", lambda *a, **k: calls.append(a))
    with _embedding_placement(model, decoder_layers(model), META, offload=False):
        pass
    assert calls == []


def test_onloaded_moves_exactly_one_layer_there_and_back(monkeypatch):
    model = tiny_model("llama")
    layers = decoder_layers(model)
    calls = []
    real = models_mod.move_module

    def move(module, device):  # really moves to meta; records the way back (meta has no data)
        calls.append((module, device))
        if device == META:
            real(module, device)

    monkeypatch.setattr(models_mod, "move_module", move)
    with onloaded(layers[1], META, enabled=True) as layer:
        assert layer is layers[1] and _devices(layer) == {"meta"}
        assert _devices(layers[0]) == {"cpu"} and _devices(model.model.embed_tokens) == {"cpu"}
    assert calls == [(layers[1], META), (layers[1], torch.device("cpu"))]  # back to its home
    calls.clear()
    with onloaded(layers[0], META, enabled=False):
        pass
    assert calls == []  # without offload the whole model already lives on the device


def test_prepare_moves_the_whole_model_only_without_offload(monkeypatch):
    moved = []
    monkeypatch.setattr(models_mod, "move_module", lambda m, d: moved.append((m, d)))
    model = tiny_model("llama")
    inputs_mod._prepare(model, META, offload=True)
    assert moved == []
    inputs_mod._prepare(model, META, offload=False)
    assert moved == [(model, META)]


# ---- statistics live on the compute device, in float32 -----------------------------------------


@pytest.mark.parametrize("method,stat_cls", [("wanda", ColumnSquares), ("sparsegpt", Hessian)])
def test_statistics_are_created_on_the_compute_device_not_the_weights(method, stat_cls):
    layer = decoder_layers(tiny_model("llama").to(torch.bfloat16))[0]  # weights: cpu, bf16
    linears = find_linears(layer)
    groups = _llama_groups(linears)
    run = _Run(make_pruner(method), HALF, META, True, prune_mod.PruneResult(method, HALF),
               progress=False)
    hooked, owned = _make_stats(run, linears, groups)
    assert set(owned) == set(linears) and len(hooked) == 4  # q/k/v and gate/up share
    for stat in hooked.values():
        assert isinstance(stat, stat_cls) and stat.device == META
        tensor = stat.sum_sq if isinstance(stat, ColumnSquares) else stat.xtx
        assert tensor.device == META and tensor.dtype == torch.float32


def _llama_groups(linears):
    names = [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
             ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)]
    order = [n for group in names for n in group]
    return [groups_mod.InputGroup(g, order.index(g[-1]), (g[-1], 1)) for g in names]


def test_bf16_activations_accumulate_in_float32_on_device():
    for stat in (ColumnSquares(8, META), Hessian(8, META)):
        stat.add_batch(torch.empty(2, 3, 8, dtype=torch.bfloat16, device=META))
        tensor = stat.sum_sq if isinstance(stat, ColumnSquares) else stat.xtx
        assert tensor.device == META and tensor.dtype == torch.float32
        assert stat.n_tokens == 6 and stat.n_windows == 2


# ---- real CUDA -----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_cuda_prune_matches_cpu_and_offload_leaves_the_model_home(method, offload):
    cuda = torch.device("cuda")
    ref = prune_layerwise(tiny_model("llama"), tiny_windows(4), method, HALF,
                          device=torch.device("cpu"), batch_size=2, progress=False)
    model = tiny_model("llama")
    res = prune_layerwise(model, tiny_windows(4), method, HALF, device=cuda, offload=offload,
                          batch_size=2, progress=False)
    assert _devices(model) == ({"cpu"} if offload else {"cuda"})
    for name, packed in ref.masks.items():
        iou = _iou(packed.unpack().numpy(), res.masks[name].unpack().numpy())
        assert iou == 1.0 if method != "sparsegpt" else iou > 0.98


def _iou(a, b) -> float:
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    return float((a & b).sum() / max((a | b).sum(), 1))
