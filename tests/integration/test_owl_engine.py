"""OWL layer-wise sparsity through the engine: the dense pre-pass, per-layer targets, config."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import Config
from pipeline.engine import prune_layerwise
from pipeline.engine.owl import owl_layer_sparsities, owl_ratios
from pipeline.errors import LangpruneError
from pipeline.models import find_linears
from pipeline.pruners import SparsityTarget, make_pruner
from pipeline.pruners.owl import outlier_ratio
from pipeline.pruners.wanda import wanda_scores
from pipeline.sparsity import sparsity_tables
from tests.tiny import tiny_model, tiny_windows

CPU = torch.device("cpu")


def test_owl_ratios_equal_the_pooled_wanda_scores_of_the_dense_model():
    model = tiny_model("llama")
    windows = tiny_windows(4)
    ratios = owl_ratios(model, windows, m=2.0, device=CPU, batch_size=2)
    # layer 0: its inputs are the embeddings, so the oracle is computable directly
    norms = {}
    layer = model.model.layers[0]
    handles = [lin.register_forward_pre_hook(
        lambda mod, args, _n=name: norms.__setitem__(
            _n, norms.get(_n, 0) + args[0].reshape(-1, args[0].shape[-1]).square().sum(0)))
        for name, lin in find_linears(layer).items()]
    with torch.no_grad():
        model(input_ids=windows)
    for h in handles:
        h.remove()
    pooled = torch.cat([wanda_scores(lin.weight, norms[n].sqrt()).reshape(-1)
                        for n, lin in find_linears(layer).items()])
    assert ratios[0] == pytest.approx(outlier_ratio(pooled, 2.0), abs=1e-6)
    assert len(ratios) == len(model.model.layers)


def test_per_layer_targets_reach_each_layer_and_keep_the_mean():
    model = tiny_model("llama")
    windows = tiny_windows(4)
    sparsities = owl_layer_sparsities(model, windows, 0.5, m=2.0, lam=0.08, device=CPU,
                                      batch_size=2)
    assert sum(sparsities) / len(sparsities) == pytest.approx(0.5)
    assert max(sparsities) > min(sparsities)  # the tiny model's layers differ
    result = prune_layerwise(model, windows, make_pruner("wanda"), SparsityTarget(0.5),
                             device=CPU, batch_size=2, progress=False,
                             layer_sparsities=sparsities)
    _, layers, _ = sparsity_tables(result)
    for row in layers.itertuples():
        assert row.target == pytest.approx(sparsities[row.layer])
        assert abs(row.sparsity - row.target) < 0.02  # floor per row of every matrix


def test_per_layer_targets_are_refused_for_n_m_and_wrong_lengths():
    model = tiny_model("llama")
    with pytest.raises(LangpruneError, match="unstructured"):
        prune_layerwise(model, tiny_windows(2), make_pruner("wanda"), SparsityTarget(0.5, 2, 4),
                        device=CPU, progress=False, layer_sparsities=[0.5] * 2)
    with pytest.raises(LangpruneError, match="layer sparsities given"):
        prune_layerwise(model, tiny_windows(2), make_pruner("wanda"), SparsityTarget(0.5),
                        device=CPU, progress=False, layer_sparsities=[0.5])


@pytest.mark.parametrize("overrides,match", [
    ({"layer_sparsity": "owel"}, "did you mean owl"),
    ({"layer_sparsity": "owl", "pattern": "2:4"}, "N:M pattern"),
    ({"layer_sparsity": "owl", "owl_lambda": "0.6"}, r"owl_lambda must be in \[0, .*0.5\]"),
    ({"layer_sparsity": "owl", "owl_m": "0"}, "owl_m: .* > 0"),
])
def test_bad_owl_settings_are_one_line_errors(overrides, match):
    with pytest.raises(LangpruneError, match=match) as err:
        Config.from_overrides(overrides)
    assert "\n" not in str(err.value)
