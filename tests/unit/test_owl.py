"""Hand-computed and property tests of OWL's layer-wise sparsities."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import LangpruneError
from pipeline.pruners import outlier_ratio, owl_sparsities


def _layer(outliers: int, size: int = 100) -> torch.Tensor:
    """``outliers`` scores of 10 among zeros: mean 10k/size, so with M = 5 and k < 20 exactly
    the k tens exceed M * mean."""
    scores = torch.zeros(size)
    scores[:outliers] = 10.0
    return scores[torch.randperm(size, generator=torch.Generator().manual_seed(outliers))]


# ---- outlier ratio ------------------------------------------------------------------------


def test_outlier_ratio_counts_scores_strictly_above_m_times_the_mean():
    scores = torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0])  # mean 1
    assert outlier_ratio(scores, 5.0) == 0.0  # 5 is not > 5 * 1
    assert outlier_ratio(scores, 4.0) == 0.2
    assert outlier_ratio(scores.reshape(5, 1), 4.0) == 0.2  # any shape
    assert outlier_ratio(torch.ones(3, 4), 0.5) == 1.0
    for k in (1, 2, 4, 19):
        assert outlier_ratio(_layer(k), 5.0) == k / 100
    assert outlier_ratio(_layer(20), 5.0) == 0.0  # 10 == 5 * mean(2): not an outlier


# ---- per-layer sparsities -------------------------------------------------------------------


def test_three_layers_with_known_outlier_counts_get_exact_sparsities():
    # D = [0.01, 0.02, 0.04] -> min-max [0, 1/3, 1] -> x 2 lambda (0.18) = [0, 0.06, 0.18],
    # mean 0.08 -> S = 0.5 - ([0, 0.06, 0.18] - 0.08) = [0.58, 0.52, 0.40].
    got = owl_sparsities([_layer(1), _layer(2), _layer(4)], 0.5, m=5.0, lam=0.09)
    assert got == pytest.approx([0.58, 0.52, 0.40], abs=1e-12)
    assert all(isinstance(s, float) for s in got)


def test_two_layers_spread_by_exactly_two_lambda():
    # Two layers: scaled [0, 2 lambda], mean lambda -> S = sparsity +- lambda.
    got = owl_sparsities([_layer(3), _layer(7)], 0.7, lam=0.08)
    assert got == pytest.approx([0.78, 0.62], abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_mean_is_preserved_and_more_outliers_means_lower_sparsity(seed):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 20, (12,), generator=gen).tolist()
    if len(set(counts)) == 1:
        counts[0] = (counts[0] + 1) % 20
    layers = [_layer(k) for k in counts]
    sparsity = 0.6
    got = owl_sparsities(layers, sparsity, lam=0.08)
    assert sum(got) / len(got) == pytest.approx(sparsity, abs=1e-12)
    assert max(got) - min(got) == pytest.approx(2 * 0.08, abs=1e-12)  # full range used
    for i in range(len(counts)):
        for j in range(len(counts)):
            if counts[i] > counts[j]:
                assert got[i] < got[j]
            elif counts[i] == counts[j]:
                assert got[i] == got[j]


def test_mean_is_preserved_on_heavy_tailed_wanda_like_scores():
    gen = torch.Generator().manual_seed(9)
    layers = []
    for scale in (1.0, 2.0, 4.0, 8.0):
        w = torch.randn(64, 128, generator=gen)
        norms = torch.rand(128, generator=gen)
        norms[:4] *= 20 * scale  # outlier input features, more in deeper layers
        layers.append((w.abs() * norms).reshape(-1))
    got = owl_sparsities(layers, 0.5)
    assert sum(got) / 4 == pytest.approx(0.5, abs=1e-12)
    assert got == sorted(got, reverse=True)  # more outlier mass, lower sparsity
    assert got[0] > 0.5 > got[-1]


def test_equal_outlier_ratios_give_uniform_sparsity():
    assert owl_sparsities([_layer(3), _layer(3), _layer(3)], 0.5) == [0.5, 0.5, 0.5]
    assert owl_sparsities([_layer(5)], 0.7) == [0.7]
    assert owl_sparsities([torch.ones(10), torch.full((4,), 2.0)], 0.5) == [0.5, 0.5]  # D = 0
    assert owl_sparsities([_layer(1), _layer(4)], 0.5, lam=0.0) == [0.5, 0.5]


def test_lambda_at_its_bound_is_allowed_when_the_results_stay_in_range():
    # lambda = min(s, 1 - s) = 0.3 with two layers: S = 0.3 +- 0.3 = [0.6, 0.0].
    assert owl_sparsities([_layer(1), _layer(2)], 0.3, lam=0.3) == pytest.approx([0.6, 0.0],
                                                                              abs=1e-12)


# ---- bad inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lam=0.31), r"lambda must be in \[0, min\(sparsity, 1 - sparsity\)\] = \[0, 0.3\]"),
        (dict(lam=-0.01), "lambda must be in"),
        (dict(lam=float("nan")), "lambda must be in"),
        (dict(m=0.0), "M must be a finite number > 0"),
        (dict(m=-1.0), "M must be a finite number > 0"),
        (dict(m=float("inf")), "M must be a finite number > 0"),
    ],
)
def test_bad_parameters_are_one_line_errors(kwargs, match):
    with pytest.raises(LangpruneError, match=match) as err:
        owl_sparsities([_layer(1), _layer(2)], 0.7, **kwargs)
    assert "\n" not in str(err.value)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(LangpruneError, match="at least one layer"):
        owl_sparsities([], 0.5)
    with pytest.raises(LangpruneError, match="empty"):
        owl_sparsities([_layer(1), torch.empty(0)], 0.5)
    with pytest.raises(LangpruneError, match="NaN or Inf"):
        owl_sparsities([_layer(1), torch.tensor([1.0, float("nan")])], 0.5)
    with pytest.raises(LangpruneError, match="sparsity"):
        owl_sparsities([_layer(1)], 1.0)


def test_a_layer_pushed_outside_0_1_is_an_error_with_the_range():
    # Three layers D = [0.01, 0.01, 0.04]: scaled [0, 0, 2 lambda], mean 2 lambda / 3, so
    # the outlier layer gets s - 4 lambda / 3 = 0.1 - 0.1333 < 0 although lambda <= s.
    with pytest.raises(LangpruneError, match=r"layer 2 is -0.0333.*outside \[0, 1\)"):
        owl_sparsities([_layer(1), _layer(1), _layer(4)], 0.1, lam=0.1)
    # And above: D = [0.01, 0.04, 0.04] at s = 0.9 gives layer 0 s + 4 lambda / 3 > 1.
    with pytest.raises(LangpruneError, match=r"layer 0 is 1.0333.*outside \[0, 1\)"):
        owl_sparsities([_layer(1), _layer(4), _layer(4)], 0.9, lam=0.1)
