"""The layer-wise driver on tiny random models of every supported family."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

import pipeline.models as models_mod
from pipeline.engine import (
    LayerStep,
    capture_layer_inputs,
    discover_input_groups,
    layerwise_forward,
)
from pipeline.engine.prune import PROBE_TOKENS
from pipeline.errors import LangpruneError
from pipeline.models import decoder_layers, find_linears
from pipeline.pruners import ColumnSquares, Hessian, LayerPruner, PruneOutcome, SparsityTarget
from pipeline.sparsity import sparsity_tables
from tests.tiny import FAMILIES, prune_layerwise, tiny_model, tiny_windows

CPU = torch.device("cpu")
HALF = SparsityTarget(0.5)


class NoopPruner(LayerPruner):
    """Accumulates a real statistic (so hooks and passes run) but prunes nothing."""

    name = "noop"

    def make_statistic(self, in_features, device):
        return ColumnSquares(in_features, device)

    def prune(self, weight, statistic, target):
        return PruneOutcome(weight.clone(), torch.zeros_like(weight, dtype=torch.bool))


def _reference_hidden_states(model, windows):
    with torch.no_grad():
        return model(windows, output_hidden_states=True).hidden_states


def _final_norm(model) -> nn.Module:
    base = model.base_model
    return getattr(base, "norm", None) or base.final_layer_norm


@pytest.mark.parametrize("family", FAMILIES)
def test_noop_driver_feeds_every_layer_the_models_own_hidden_states(family):
    model = tiny_model(family)
    windows = tiny_windows(5)
    hs = _reference_hidden_states(model, windows)
    layers = decoder_layers(model)
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}

    def record(i, module, args):
        if "forward" not in module.__dict__:  # skip the capture pass's stand-in forwards
            seen[i].append(args[0].clone())

    handles = [layer.register_forward_pre_hook(partial(record, i))
               for i, layer in enumerate(layers)]
    try:
        result = prune_layerwise(model, windows, NoopPruner(), HALF, device=CPU, batch_size=2,
                                 progress=False)
    finally:
        for h in handles:
            h.remove()
    for i, calls in seen.items():
        expected = hs[i].split(2)  # layer i's input is hidden_states[i] (layer i-1's output)
        assert len(calls) >= len(expected)
        for x in calls:  # a batch, or the group-discovery probe: the first tokens of window 0
            assert any(x.shape == e.shape and torch.allclose(x, e, atol=1e-6, rtol=1e-5)
                       for e in expected) or (
                x.shape[:2] == (1, min(PROBE_TOKENS, expected[0].shape[1]))
                and torch.allclose(x, expected[0][:1, :x.shape[1]], atol=1e-6, rtol=1e-5)
            ), f"layer {i} got an input the dense model never made"
    assert len(result.masks) == sum(len(find_linears(layer)) for layer in layers)
    assert all(pm.count() == 0 for pm in result.masks.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_forward_outputs_equal_output_hidden_states(family):
    model = tiny_model(family)
    windows = tiny_windows(5)
    hs = _reference_hidden_states(model, windows)
    steps: list[LayerStep] = []
    for step in layerwise_forward(model, windows, device=CPU, batch_size=2):
        steps.append(step)
        out = torch.cat(step.outputs)
        if step.index < len(hs) - 2:
            torch.testing.assert_close(out, hs[step.index + 1], atol=1e-6, rtol=1e-5)
        else:  # transformers replaces the last entry by the final-normed state
            with torch.no_grad():
                torch.testing.assert_close(_final_norm(model)(out), hs[-1], atol=1e-6, rtol=1e-5)
    assert [s.index for s in steps] == list(range(len(hs) - 1))
    assert steps[0].name.endswith(".0")


def test_gemma3_layers_get_their_own_masks_and_rotary_embeddings():
    model = tiny_model("gemma3")
    windows = tiny_windows(2)
    (batch,) = capture_layer_inputs(model, windows, batch_size=4, device=CPU)
    types = model.config.layer_types
    sliding, full = types.index("sliding_attention"), types.index("full_attention")
    kw_s, kw_f = batch.layer_kwargs[sliding], batch.layer_kwargs[full]
    assert not torch.equal(kw_s["position_embeddings"][0], kw_f["position_embeddings"][0])
    assert (kw_s["attention_mask"] is None) != (kw_f["attention_mask"] is None) or not torch.equal(
        kw_s["attention_mask"], kw_f["attention_mask"])
    # Negative control: feeding the global layer the sliding layer's inputs changes its output.
    hs = _reference_hidden_states(model, windows)
    layer = decoder_layers(model)[full]
    with torch.no_grad():
        right = batch.call(layer, full, hs[full])
        wrong = layer(hs[full], **kw_s)
    torch.testing.assert_close(right, hs[full + 1], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(wrong, right, atol=1e-4)


def test_calibration_never_runs_the_lm_head_or_final_norm():
    model = tiny_model("llama")
    calls = {"lm_head": 0, "norm": 0}
    for key, module in (("lm_head", model.lm_head), ("norm", model.model.norm)):
        module.register_forward_hook(lambda *a, key=key: calls.__setitem__(key, calls[key] + 1))
    prune_layerwise(model, tiny_windows(4), "sparsegpt", HALF, device=CPU, batch_size=2,
                    progress=False, sparsegpt_blocksize=16)
    assert calls == {"lm_head": 0, "norm": 0}


def _no_leftovers(model):
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks, type(m).__name__
        assert "forward" not in m.__dict__


class _FailingPruner(NoopPruner):
    def __init__(self):
        self.calls = 0

    def prune(self, weight, statistic, target):
        self.calls += 1
        if self.calls > 8:  # somewhere in layer 1, after hooks and passes have run
            raise RuntimeError("boom")
        return super().prune(weight, statistic, target)


def test_hooks_and_forward_swaps_are_removed_even_after_an_error():
    model = tiny_model("llama")
    prune_layerwise(model, tiny_windows(4), "wanda", HALF, device=CPU, batch_size=2,
                    progress=False)
    _no_leftovers(model)
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="boom"):
        prune_layerwise(model, tiny_windows(4), _FailingPruner(), HALF, device=CPU,
                        batch_size=2, progress=False)
    _no_leftovers(model)


def test_nan_weight_is_an_error_naming_the_module_before_any_forward():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    calls = []
    model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(LangpruneError, match=r"model\.layers\.1\.mlp\.up_proj: weight .*NaN"):
        prune_layerwise(model, tiny_windows(4), "wanda", HALF, device=CPU, progress=False)
    assert calls == []


def test_training_flag_is_restored():
    model = tiny_model("llama").train()
    prune_layerwise(model, tiny_windows(2), "wanda", HALF, device=CPU, progress=False)
    assert model.training


def test_non_finite_statistics_name_the_modules():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = float("inf")
    with pytest.raises(LangpruneError, match=r"statistics of model\.layers\.0\.self_attn\.q_proj"):
        prune_layerwise(model, tiny_windows(2), "wanda", HALF, device=CPU, progress=False)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_same_seed_and_inputs_give_bit_identical_masks(method):
    results = []
    for _ in range(2):
        model = tiny_model("gemma3", seed=3)
        results.append(prune_layerwise(model, tiny_windows(4, seed=1), method, HALF, device=CPU,
                                       batch_size=2, progress=False, sparsegpt_blocksize=16))
    a, b = results
    assert list(a.masks) == list(b.masks)
    for name in a.masks:
        assert np.array_equal(a.masks[name].bits, b.masks[name].bits), name
    other = prune_layerwise(tiny_model("gemma3", seed=3), tiny_windows(4, seed=2), method, HALF,
                            device=CPU, batch_size=2, progress=False, sparsegpt_blocksize=16)
    assert any(not np.array_equal(a.masks[n].bits, other.masks[n].bits) for n in a.masks)


def test_input_groups_follow_forward_order():
    for family, expected in [
        ("llama", [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                   ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)]),
        # Cohere's parallel block: attention and MLP read the same normed input.
        ("cohere", [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "mlp.gate_proj", "mlp.up_proj"), ("self_attn.o_proj",), ("mlp.down_proj",)]),
    ]:
        model = tiny_model(family)
        (batch,) = capture_layer_inputs(model, tiny_windows(2), batch_size=2, device=CPU)
        layer = decoder_layers(model)[0]
        with torch.inference_mode():
            groups = discover_input_groups(layer, find_linears(layer), batch, 0)
        assert [g.names for g in groups] == expected


@pytest.mark.parametrize("method, stat_cls", [("wanda", ColumnSquares), ("sparsegpt", Hessian)])
def test_statistics_are_shared_by_modules_reading_the_same_input(monkeypatch, method, stat_cls):
    accumulations = []
    original = stat_cls._accumulate
    monkeypatch.setattr(stat_cls, "_accumulate",
                        lambda self, flat: (accumulations.append(id(self)), original(self, flat)))
    run = partial(prune_layerwise, windows=tiny_windows(4), method=method, target=HALF,
                  device=CPU, batch_size=2, progress=False, sparsegpt_blocksize=16)
    shared_model, separate_model = tiny_model("llama"), tiny_model("llama")
    shared = run(shared_model)
    n_shared = len(accumulations)
    accumulations.clear()
    separate = run(separate_model, share_statistics=False)
    # Per layer: q/k/v, o, gate/up, down -> 4 statistics shared versus 7 separate.
    assert (shared.n_statistics, separate.n_statistics) == (8, 14)
    assert (n_shared, len(accumulations)) == (8 * 2, 14 * 2)  # x 2 batches
    for name in shared.masks:  # sharing changes the cost, never the result
        assert np.array_equal(shared.masks[name].bits, separate.masks[name].bits), name
    for a, b in zip(shared_model.parameters(), separate_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_true_sequential_prunes_groups_in_order():
    plain = prune_layerwise(tiny_model("llama"), tiny_windows(4), "sparsegpt", HALF, device=CPU,
                            batch_size=2, progress=False, sparsegpt_blocksize=16)
    seq = prune_layerwise(tiny_model("llama"), tiny_windows(4), "sparsegpt", HALF, device=CPU,
                          batch_size=2, progress=False, sparsegpt_blocksize=16,
                          true_sequential=True)
    first = "model.layers.0.self_attn.q_proj"
    assert np.array_equal(plain.masks[first].bits, seq.masks[first].bits)  # same inputs
    later = "model.layers.0.mlp.down_proj"  # sees pruned attention and gate/up outputs
    assert not np.array_equal(plain.masks[later].bits, seq.masks[later].bits)
    order = [r.module.split("layers.0.")[1] for r in seq.records if r.layer == 0]
    assert order == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_offload_moves_one_layer_at_a_time(monkeypatch, method):
    model = tiny_model("gemma3")
    layers = decoder_layers(model)
    onloaded: set[int] = set()
    moves: list[tuple[int, str]] = []
    real_move = models_mod.move_module

    def spy(module, device):  # on CPU "device" and "home" coincide: toggle on each move
        idx = next((i for i, layer in enumerate(layers) if layer is module), None)
        if idx is not None:
            (onloaded.discard if idx in onloaded else onloaded.add)(idx)
            moves.append((idx, str(device)))
        real_move(module, device)

    monkeypatch.setattr(models_mod, "move_module", spy)
    during: list[tuple[int, set[int]]] = []
    result = prune_layerwise(model, tiny_windows(4), method, HALF, device=CPU, offload=True,
                             batch_size=2, progress=False,
                             on_layer_done=lambda i, recs: during.append((i, set(onloaded))))
    assert during == [(i, {i}) for i in range(len(layers))]
    assert moves == [m for i in range(len(layers)) for m in ((i, "cpu"), (i, "cpu"))]
    reference = prune_layerwise(tiny_model("gemma3"), tiny_windows(4), method, HALF, device=CPU,
                                batch_size=2, progress=False)
    for name in reference.masks:
        assert np.array_equal(reference.masks[name].bits, result.masks[name].bits)


def test_offload_keeps_layers_home_and_moves_embeddings(monkeypatch):
    """With offload only the embedding pass modules travel; decoder layers move via move_module."""
    model = tiny_model("llama")
    moved = []
    real = models_mod.move_tensors
    monkeypatch.setattr(models_mod, "move_tensors",
                        lambda module, device, skip=(): (moved.append({id(m) for m in skip}),
                                                         real(module, device, skip)))
    prune_layerwise(model, tiny_windows(2), "wanda", HALF, device=CPU, offload=True,
                    progress=False)
    layer_ids = {id(layer) for layer in decoder_layers(model)}
    assert len(moved) == 2 and all(layer_ids <= skip for skip in moved)  # there and back


def test_sparsity_report_rows():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:, :4] = 0.0  # 128 * 4 zeros already present
    result = prune_layerwise(model, None, "magnitude", HALF, device=CPU, progress=False)
    modules, layers, overall = sparsity_tables(result)
    assert list(layers["layer"]) == [0, 1]
    assert np.allclose(modules["sparsity"], 0.5) and overall["sparsity"] == 0.5
    row = modules.set_index("module").loc["model.layers.0.mlp.up_proj"]
    assert row["zeros_before"] == 512 and row["zeros_after"] == row["pruned"]
    assert overall["preexisting_zero_fraction"] == pytest.approx(512 / overall["numel"])
    assert modules["loss"].isna().all() and overall["damp_retries"] == 0
    sg = prune_layerwise(tiny_model("llama"), tiny_windows(2), "sparsegpt",
                         SparsityTarget(0.5, 2, 4), device=CPU, progress=False,
                         sparsegpt_blocksize=16)
    _, sg_layers, sg_overall = sparsity_tables(sg)
    assert (sg_layers["loss"] > 0).all() and sg_overall["sparsity"] == 0.5


def test_bfloat16_model_keeps_its_dtype_and_float32_statistics(monkeypatch):
    model = tiny_model("qwen2").to(torch.bfloat16)
    dtypes = set()
    original = ColumnSquares._accumulate
    monkeypatch.setattr(ColumnSquares, "_accumulate",
                        lambda self, flat: (dtypes.add(self.sum_sq.dtype), original(self, flat)))
    result = prune_layerwise(model, tiny_windows(4), "wanda", HALF, device=CPU, batch_size=2,
                             progress=False)
    assert dtypes == {torch.float32}
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(pm.count() * 2 == pm.numel for pm in result.masks.values())


# ---- errors before any work -----------------------------------------------------------------


class _NoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)


def test_unsupported_model_names_what_was_looked_for():
    with pytest.raises(LangpruneError, match="_no_split_modules.*identical blocks"):
        decoder_layers(_NoLayers())


def test_fallback_finds_a_modulelist_of_identical_blocks():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([nn.Identity()])
            self.blocks = nn.ModuleList([Block() for _ in range(3)])

    net = Net()
    assert decoder_layers(net) is net.blocks


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="wandaa"), "known: magnitude, ria, sparsegpt, wanda"),
        (dict(target=SparsityTarget(0.5, 2, 4), sparsegpt_blocksize=6, method="sparsegpt"),
         "multiple of M=4"),
        (dict(target=SparsityTarget(1 / 28, 1, 28)), "not divisible"),
        (dict(windows=torch.zeros(0, 8, dtype=torch.long)), "non-empty"),
        (dict(windows=torch.rand(2, 8)), "token ids"),
        (dict(windows=None), "needs calibration windows"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_bad_requests_fail_before_any_forward(kwargs, match):
    model = tiny_model("llama")
    calls = []
    model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    args = dict(windows=tiny_windows(2), method="wanda", target=HALF, device=CPU, progress=False)
    args.update(kwargs)
    with pytest.raises(LangpruneError, match=match):
        prune_layerwise(model, args.pop("windows"), args.pop("method"), args.pop("target"), **args)
    assert calls == []


def test_two_walks_can_be_interleaved_without_leaking_grad_mode():
    dense, pruned = tiny_model("llama"), tiny_model("llama")
    prune_layerwise(pruned, tiny_windows(4), "wanda", HALF, device=CPU, progress=False)
    walks = zip(layerwise_forward(dense, tiny_windows(4), device=CPU),
                layerwise_forward(pruned, tiny_windows(4), device=CPU), strict=True)
    for a, b in walks:
        assert not torch.is_inference_mode_enabled()  # nothing held across the yield
        local = a.run(b.layer)  # the pruned layer on the dense inputs (local SNR)
        assert not torch.equal(torch.cat(local), torch.cat(a.outputs))
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_one_pass_sequential_equals_re_running_the_layer_per_group(monkeypatch, family, method):
    """true_sequential runs each layer once per batch (paused at every group); the values are
    those of the reference that re-runs the layer for every group and once more to
    propagate: same masks, same weights, bit for bit."""
    import pipeline.engine.prune as prune_mod

    def rerun(run, layer, inputs, index, prefix, groups):
        records = []
        for group in groups:
            records += prune_mod._prune_groups(run, layer, inputs, index, prefix, [group])
        prune_mod._propagate(layer, inputs, index)
        return records

    one_pass_model = tiny_model(family)
    one_pass = prune_layerwise(one_pass_model, tiny_windows(6), method, HALF, device=CPU,
                               batch_size=2, progress=False, sparsegpt_blocksize=16,
                               true_sequential=True)
    passes = {"n": 0, "probe": 0}
    real_call = prune_mod.LayerInput.call

    def counting(self, layer, index, hidden_states=None):
        # batches hold 2 windows; the group-discovery probe is a few tokens of 1 window
        passes["n" if self.hidden_states.shape[0] > 1 else "probe"] += 1
        return real_call(self, layer, index, hidden_states)

    monkeypatch.setattr(prune_mod, "_prune_sequential", rerun)
    reference_model = tiny_model(family)
    reference = prune_layerwise(reference_model, tiny_windows(6), method, HALF, device=CPU,
                                batch_size=2, progress=False, sparsegpt_blocksize=16,
                                true_sequential=True)
    assert one_pass.masks.keys() == reference.masks.keys()
    for name in one_pass.masks:
        assert np.array_equal(one_pass.masks[name].bits, reference.masks[name].bits), name
    for a, b in zip(one_pass_model.parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(a, b)
    # one forward per batch and layer (3 batches), against one per group plus one
    monkeypatch.setattr(prune_mod.LayerInput, "call", counting)
    prune_layerwise(tiny_model(family), tiny_windows(6), method, HALF, device=CPU,
                    batch_size=2, progress=False, sparsegpt_blocksize=16,
                    true_sequential=True)
    n_layers = len(decoder_layers(one_pass_model))
    # the re-run reference is still patched in: groups + 1 calls per batch and layer
    assert passes["n"] > 3 * n_layers * 2
    passes.update(n=0, probe=0)
    monkeypatch.undo()
    monkeypatch.setattr(prune_mod.LayerInput, "call", counting)
    prune_layerwise(tiny_model(family), tiny_windows(6), method, HALF, device=CPU,
                    batch_size=2, progress=False, sparsegpt_blocksize=16,
                    true_sequential=True)
    # the probe finds the input groups of each layer kind, and follows the batches down
    kinds = len({type(layer) for layer in decoder_layers(one_pass_model)})
    assert passes["n"] == 3 * n_layers
    assert passes["probe"] == kinds + n_layers


def test_groups_come_from_the_probe_unless_it_skips_a_linear():
    """A layer that calls a linear only on longer inputs (as an MoE router may skip an expert
    on a few tokens) gets its groups from the real batch; others from the probe."""
    from pipeline.engine.groups import discover_groups
    from pipeline.engine.inputs import LayerInput

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            x = self.a(x)
            return self.b(x) if x.shape[1] > 3 else x

    layer = Layer()
    probe = LayerInput(torch.randn(1, 2, 4), [()], [{}])
    batch = LayerInput(torch.randn(2, 8, 4), [()], [{}])
    linears = {"a": layer.a, "b": layer.b}
    seen = []
    layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    groups = discover_groups(layer, linears, [probe, batch], 0)
    assert [g.names for g in groups] == [("a",), ("b",)] and seen == [2, 8]
    seen.clear()
    assert [g.names for g in discover_groups(layer, {"a": layer.a}, [probe, batch], 0)] == [("a",)]
    assert seen == [2]  # the probe was enough
    with pytest.raises(LangpruneError, match="b never ran"):
        discover_groups(layer, linears, [probe, probe], 0)
