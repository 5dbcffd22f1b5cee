"""LAPE: counting, scores, selection of planted language-specific neurons, overlap, removal."""

from __future__ import annotations

import math

import pytest
import torch

from analysis.lape import (
    ActivationCounter,
    activation_threshold,
    lape_scores,
    removed_fraction,
    select_language_specific,
    selection_overlap,
)
from pipeline.errors import LangpruneError

LANGS = ["de", "en", "sw", "zh"]
LAYERS, NEURONS, TOKENS = 3, 200, 1500
# (layer, neuron) -> languages it fires for (p = 0.9 there, 0 elsewhere); 6 = 1% of 600 neurons
PLANTED = {
    (0, 5): {"de"},
    (0, 77): {"sw"},
    (1, 10): {"zh"},
    (1, 150): {"en"},
    (2, 3): {"sw"},
    (2, 199): {"de", "en"},
}


def synthetic_probabilities(gen: torch.Generator) -> torch.Tensor:
    """Target firing probabilities: shared background neurons plus the planted ones."""
    background = 0.1 + 0.4 * torch.rand(LAYERS, NEURONS, generator=gen)
    p = background.expand(len(LANGS), -1, -1).clone()
    p += 0.02 * torch.rand(p.shape, generator=gen)  # small language differences
    for (layer, j), langs in PLANTED.items():
        p[:, layer, j] = torch.tensor([0.9 if lang in langs else 0.0 for lang in LANGS])
    return p


def count_synthetic_activations(p: torch.Tensor, gen: torch.Generator) -> ActivationCounter:
    """Feed activations drawn so that act > 0 with probability p, with padding to ignore."""
    counter = ActivationCounter(LANGS, LAYERS, NEURONS)
    for k, lang in enumerate(LANGS):
        for layer in range(LAYERS):
            for batch in torch.arange(TOKENS).split(500):
                fires = torch.rand(1, len(batch), NEURONS, generator=gen) < p[k, layer]
                act = torch.where(fires, 1.0, -1.0)
                act = torch.cat([act, torch.ones(1, 7, NEURONS)], dim=1)  # padding fires
                mask = torch.cat([torch.ones(1, len(batch)), torch.zeros(1, 7)], dim=1)
                counter.update(lang, layer, act, mask)
    return counter


@pytest.fixture(scope="module")
def synthetic():
    """(target p, counter fed with activations drawn from it), built once for the module."""
    gen = torch.Generator().manual_seed(0)
    p = synthetic_probabilities(gen)
    return p, count_synthetic_activations(p, gen)


def test_counter_probabilities_match_targets_and_ignore_padding(synthetic):
    p, counter = synthetic
    assert counter.tokens.eq(TOKENS).all()
    estimate = counter.probabilities()
    assert estimate.dtype == torch.float64 and estimate.shape == p.shape
    assert (estimate - p.double()).abs().max() < 0.06


def test_selection_finds_planted_neurons(synthetic):
    p = synthetic[1].probabilities()
    selected = select_language_specific(p, LANGS)
    expected = {lang: {n for n, langs in PLANTED.items() if lang in langs} for lang in LANGS}
    assert selected == expected


def test_lape_scores_hand_computed():
    p = torch.tensor([[[0.5, 0.2, 0.0]], [[0.5, 0.0, 0.0]], [[0.0, 0.0, 0.0]]])
    scores = lape_scores(p)
    assert scores.shape == (1, 3)
    assert scores[0, 0].item() == pytest.approx(math.log(2))
    assert scores[0, 1].item() == 0.0
    assert math.isnan(scores[0, 2].item())  # never fires: undefined


def test_threshold_is_kth_smallest_and_filter_drops_low_neurons():
    p = (torch.arange(1, 21, dtype=torch.float64) / 20).reshape(1, 1, 20)
    assert activation_threshold(p, 0.95) == pytest.approx(0.95)
    # Two languages, 4 neurons: threshold = 6th smallest of 8 values = 0.31. Only neuron 3
    # exceeds it (in both languages), so the most specific neuron 0 is dropped by the filter,
    # neuron 2 (0.31, not above) too, and neuron 3 belongs to both languages.
    p = torch.tensor([[[0.01, 0.3, 0.3, 0.9]], [[0.0, 0.3, 0.31, 0.5]]], dtype=torch.float64)
    selected = select_language_specific(p, ["a", "b"], top_rate=0.5, filter_quantile=0.75)
    assert selected == {"a": {(0, 3)}, "b": {(0, 3)}}


def test_selection_rejects_bad_arguments():
    p = torch.rand(2, 1, 4)
    with pytest.raises(LangpruneError):
        select_language_specific(p, ["a"])
    with pytest.raises(LangpruneError):
        select_language_specific(p, ["a", "b"], top_rate=0.0)
    counter = ActivationCounter(["en"], 2, 4)
    counter.update("en", 0, torch.ones(3, 4))
    with pytest.raises(LangpruneError, match="layer 1"):
        counter.probabilities()
    with pytest.raises(LangpruneError, match="did you mean"):
        counter.update("eng", 0, torch.ones(3, 4))


def test_selection_overlap_jaccard():
    dense = {"en": {(0, 1), (0, 2), (1, 3)}, "de": set(), "zh": {(2, 2)}}
    pruned = {"en": {(0, 1), (1, 4)}, "de": set(), "zh": {(2, 2)}}
    table = selection_overlap(dense, pruned).set_index("lang")
    assert table.loc["en", "jaccard"] == pytest.approx(1 / 4)
    assert table.loc["zh", "jaccard"] == 1.0
    assert math.isnan(table.loc["de", "jaccard"])
    assert table.loc["en", ["n_a", "n_b", "n_both"]].tolist() == [3, 2, 1]


def test_removed_fraction_counts_rows_and_down_columns():
    hidden, inter = 4, 3
    masks = {
        f"model.layers.{layer}.mlp.{kind}": torch.zeros(shape, dtype=torch.bool)
        for layer in range(2)
        for kind, shape in (
            ("gate_proj", (inter, hidden)),
            ("up_proj", (inter, hidden)),
            ("down_proj", (hidden, inter)),
        )
    }
    masks["model.layers.0.self_attn.q_proj"] = torch.ones(hidden, hidden, dtype=torch.bool)
    masks["model.layers.0.mlp.gate_proj"][1] = True  # neuron (0, 1): 4 of gate's row
    masks["model.layers.0.mlp.down_proj"][:2, 1] = True  # 2 of down's column 1
    masks["model.layers.0.mlp.up_proj"][2] = True  # neuron (0, 2) only
    masks["model.layers.1.mlp.down_proj"][:, 0] = True  # neuron (1, 0): its column
    neurons = {"en": {(0, 1)}, "de": {(0, 1), (1, 0)}, "sw": set(), "zh": {(0, 0)}}
    removed = removed_fraction(neurons, masks)
    assert removed["en"] == pytest.approx(6 / 12)
    assert removed["de"] == pytest.approx((6 + 4) / 24)
    assert removed["zh"] == 0.0
    assert math.isnan(removed["sw"])
    del masks["model.layers.1.mlp.up_proj"]
    with pytest.raises(LangpruneError, match="up_proj"):
        removed_fraction(neurons, masks)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_counting_and_removal_match_cpu():
    gen = torch.Generator().manual_seed(5)
    act = torch.randn(2, 9, 16, generator=gen)
    mask = torch.rand(2, 9, generator=gen) < 0.7
    on_cpu, on_gpu = ActivationCounter(["en"], 1, 16), ActivationCounter(["en"], 1, 16)
    on_cpu.update("en", 0, act, mask)
    on_gpu.update("en", 0, act.cuda().bfloat16(), mask.cuda())
    assert torch.equal(on_cpu.over_zero, on_gpu.over_zero)
    assert torch.equal(on_cpu.tokens, on_gpu.tokens)
    masks = {
        f"model.layers.0.mlp.{kind}": torch.rand(shape, generator=gen) < 0.5
        for kind, shape in (("gate_proj", (16, 8)), ("up_proj", (16, 8)), ("down_proj", (8, 16)))
    }
    neurons = {"en": {(0, 1), (0, 9)}}
    expected = removed_fraction(neurons, masks)
    assert removed_fraction(neurons, {k: v.cuda() for k, v in masks.items()}) == expected
