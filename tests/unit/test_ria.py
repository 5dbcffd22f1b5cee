"""Golden and property tests of RIA (relative importance and activations)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline import stages
from pipeline.config import Config
from pipeline.engine import prune_layerwise
from pipeline.errors import LangpruneError
from pipeline.pruners import (
    PRUNERS,
    ColumnSquares,
    Hessian,
    RIAPruner,
    SparsityTarget,
    magnitude_prune,
    make_pruner,
    ria_prune,
    wanda_prune,
)
from pipeline.pruners.masks import lowest_per_row
from pipeline.pruners.ria import ria_scores
from tests.tiny import tiny_model, tiny_windows

CPU = torch.device("cpu")


def _relative_importance(w: torch.Tensor) -> torch.Tensor:
    """RI written out independently: share of the column plus share of the row."""
    a = w.abs().double()
    return a / a.sum(dim=0, keepdim=True) + a / a.sum(dim=1, keepdim=True)


# ---- golden cases -------------------------------------------------------------------------


def test_ria_golden_mask_differs_from_wanda_and_magnitude():
    # Column sums [3, 24, 8, 18], row sums [23, 30], ||X|| = 1 (activation term 1).
    w = torch.tensor([[1.0, 16.0, 4.0, 2.0], [2.0, 8.0, 4.0, 16.0]])
    # Row 0: 1/3+1/23 = 0.377, 16/24+16/23 = 1.362, 4/8+4/23 = 0.674, 2/18+2/23 = 0.198
    #   -> prune cols 3, 0.
    # Row 1: 2/3+2/30 = 0.733, 8/24+8/30 = 0.600, 4/8+4/30 = 0.633, 16/18+16/30 = 1.422
    #   -> prune cols 1, 2: the 2 is kept, it dominates its small column 0 (2 of 3).
    pruned, mask = ria_prune(w, torch.ones(4), 0.5)
    assert mask.tolist() == [[True, False, False, True], [False, True, True, False]]
    assert pruned.tolist() == [[0.0, 16.0, 4.0, 0.0], [2.0, 0.0, 0.0, 16.0]]
    scores = ria_scores(w, torch.ones(4))
    expected = torch.tensor([[1 / 3 + 1 / 23, 16 / 24 + 16 / 23, 4 / 8 + 4 / 23, 2 / 18 + 2 / 23],
                             [2 / 3 + 2 / 30, 8 / 24 + 8 / 30, 4 / 8 + 4 / 30, 16 / 18 + 16 / 30]])
    torch.testing.assert_close(scores, expected)
    # Wanda (per row, |W| * ||X||) prunes the 2 of row 1; magnitude ranks the whole matrix.
    _, m_wanda = wanda_prune(w, torch.ones(4), 0.5)
    assert m_wanda.tolist() == [[True, False, False, True], [True, False, True, False]]
    _, m_mag = magnitude_prune(w, 0.5)
    assert m_mag.tolist() == [[True, False, True, True], [True, False, False, False]]


def test_ria_raises_the_norm_not_the_sum_of_squares_to_a():
    # One row: every column term is |W|/|W| = 1, so RI = 1 + |W| / 5 = [1.8, 1.2].
    w = torch.tensor([[4.0, 1.0]])
    norms = torch.tensor([1.0, 1.96])  # ||X||^0.5 = [1, 1.4] -> scores [1.8, 1.68]
    _, mask = ria_prune(w, norms, 0.5, a=0.5)
    assert mask.tolist() == [[False, True]]
    # ||X||^2 under the same exponent is ||X||^1 = [1, 1.96] -> [1.8, 2.352]: col 0 instead.
    _, squared = ria_prune(w, norms, 0.5, a=1.0)
    assert squared.tolist() == [[True, False]]
    torch.testing.assert_close(ria_scores(w, norms), torch.tensor([[1.8, 1.68]]))


def test_alpha_zero_is_relative_importance_alone():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=gen)
    norms = torch.rand(32, generator=gen) * 10  # very uneven activations
    torch.testing.assert_close(ria_scores(w, norms, a=0.0).double(), _relative_importance(w))
    _, mask = ria_prune(w, norms, 0.5, a=0.0)
    assert torch.equal(mask, lowest_per_row(_relative_importance(w), 0.5))
    assert torch.equal(mask, ria_prune(w, torch.ones(32), 0.5)[1])  # norms play no part
    assert not torch.equal(mask, ria_prune(w, norms, 0.5, a=0.5)[1])  # ... unless a > 0


def test_ria_scores_equal_the_formula_on_random_data():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(12, 20, generator=gen)
    norms = torch.rand(20, generator=gen) + 0.1
    expected = _relative_importance(w) * norms.double() ** 0.3
    torch.testing.assert_close(ria_scores(w, norms, a=0.3).double(), expected)


def test_zero_rows_and_columns_score_zero_not_nan():
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 1.0, 2.0]])  # zero row 0, zero col 1
    scores = ria_scores(w, torch.ones(4))
    assert bool(torch.isfinite(scores).all())
    # Row 1: 3/3+3/6 = 1.5, 0, 1/1+1/6 = 1.167, 2/2+2/6 = 1.333; row 0 all 0 (ties).
    torch.testing.assert_close(scores, torch.tensor([[0.0, 0.0, 0.0, 0.0],
                                                     [1.5, 0.0, 7 / 6, 4 / 3]]))
    _, mask = ria_prune(w, torch.ones(4), 0.5)
    assert mask.tolist() == [[True, True, False, False], [False, True, True, False]]


def test_ties_go_to_the_lower_index():
    w = torch.ones(3, 8)  # every score equal
    _, mask = ria_prune(w, torch.ones(8), 0.25)
    assert mask.tolist() == [[True, True] + [False] * 6] * 3
    _, nm = ria_prune(w, torch.ones(8), 0.5, 2, 4)
    assert nm.tolist() == [[True, True, False, False] * 2] * 3
    q = torch.randint(-3, 4, (64, 64)).float()  # many exact ties and zeros
    first, second = (ria_prune(q, torch.ones(64), 0.5)[1] for _ in range(2))
    assert torch.equal(first, second)


# ---- exact sparsity and structure -----------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.1, 0.29, 0.5, 0.7])
def test_exact_sparsity_per_row(sparsity):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(7, 100, generator=gen)
    pruned, mask = ria_prune(w, torch.rand(100, generator=gen), sparsity)
    assert mask.sum(dim=1).tolist() == [math.floor(sparsity * 100 + 1e-6)] * 7
    assert torch.all(pruned[mask] == 0) and torch.equal(pruned[~mask], w[~mask])


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_exact_n_of_m(n, m):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 48, generator=gen)
    norms = torch.randn(100, 48, generator=gen).norm(dim=0)
    pruned, mask = ria_prune(w, norms, n / m, n, m)
    assert torch.all(mask.reshape(6, 48 // m, m).sum(dim=-1) == n)
    assert torch.all(pruned[mask] == 0) and torch.equal(pruned[~mask], w[~mask])
    # the n lowest scores of each group, chosen from the same scores as the unstructured path
    scores = ria_scores(w, norms).reshape(6, 48 // m, m)
    order = torch.argsort(scores, dim=-1, stable=True)[..., :n]
    expected = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, True)
    assert torch.equal(mask, expected.reshape(6, 48))


def test_golden_2_of_4():
    # Row [8, 1, 2, 4 | 1, 1, 1, 5]: column sums are the entries themselves (one row), so
    # RI = 1 + |W| / 23 and the order is the magnitude order within each group.
    w = torch.tensor([[8.0, 1.0, 2.0, 4.0, 1.0, 1.0, 1.0, 5.0]])
    _, mask = ria_prune(w, torch.ones(8), 0.5, 2, 4)
    assert mask.tolist() == [[False, True, True, False, True, True, False, False]]
    # The golden matrix above is one group of 4 per row: 2:4 keeps RIA's choice (the 2 of
    # row 1 survives), where Wanda's 2:4 prunes it.
    g = torch.tensor([[1.0, 16.0, 4.0, 2.0], [2.0, 8.0, 4.0, 16.0]])
    assert ria_prune(g, torch.ones(4), 0.5, 2, 4)[1].tolist() == [
        [True, False, False, True], [False, True, True, False]]
    assert wanda_prune(g, torch.ones(4), 0.5, 2, 4)[1][1].tolist() == [True, False, True, False]


def test_weight_is_not_modified_and_dtype_is_kept():
    gen = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(8, 16, generator=gen).to(dtype)
        before = w.clone()
        pruned, mask = ria_prune(w, torch.rand(16, generator=gen), 0.5)
        assert torch.equal(w, before)
        assert pruned.dtype == dtype and pruned.data_ptr() != w.data_ptr()
        assert int(mask.sum()) == 64


# ---- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda w: ria_prune(w, torch.ones(8), 1.0),
        lambda w: ria_prune(w, torch.ones(8), 0.6, 2, 4),
        lambda w: ria_prune(w, torch.ones(7), 0.5),
        lambda w: ria_prune(w, torch.tensor([1.0] * 7 + [float("nan")]), 0.5),
        lambda w: ria_prune(w, torch.ones(8), 0.5, a=-0.5),
        lambda w: ria_prune(w, torch.ones(8), 0.5, a=float("inf")),
        lambda w: ria_prune(w[:, :6], torch.ones(6), 0.25, 1, 4),
        lambda w: ria_prune(w.reshape(-1), torch.ones(8), 0.5),
    ],
)
def test_bad_inputs_are_clear_errors(call):
    with pytest.raises(LangpruneError):
        call(torch.randn(4, 8))


# ---- pruner class and registry ----------------------------------------------------------------


def test_pruner_through_the_registry_equals_the_pure_function():
    assert PRUNERS.get("ria") is RIAPruner
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(2, 9, 24, generator=gen) for _ in range(3)]
    w = torch.randn(10, 24, generator=gen)
    norms = torch.cat([b.reshape(-1, 24) for b in batches]).norm(dim=0)
    for options, a in (({}, 0.5), ({"ria_alpha": 0.25}, 0.25)):
        pruner = make_pruner("ria", **options)
        assert isinstance(pruner, RIAPruner) and pruner.alpha == a
        stat = pruner.make_statistic(24, CPU)
        assert isinstance(stat, ColumnSquares) and pruner.needs_calibration
        for b in batches:
            stat.add_batch(b)
        for target in (SparsityTarget(0.5), SparsityTarget(0.5, 2, 4)):
            out = pruner.prune(w, stat, target)
            ref_w, ref_mask = ria_prune(w, norms, target.sparsity, target.n, target.m, a=a)
            assert torch.equal(out.mask, ref_mask) and torch.equal(out.weight, ref_w)
            assert out.loss is None
    with pytest.raises(TypeError, match="ColumnSquares"):
        make_pruner("ria").prune(w, Hessian(24, CPU), SparsityTarget(0.5))


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_bad_alpha_option_is_a_clear_error(bad):
    with pytest.raises(LangpruneError, match="ria_alpha"):
        make_pruner("ria", ria_alpha=bad)


# ---- config and stage wiring ------------------------------------------------------------------


def test_ria_alpha_config_key_is_validated_in_one_line():
    assert Config().prune.ria_alpha == 0.5
    assert Config.from_overrides({"method": "ria", "ria_alpha": "0"}).prune.ria_alpha == 0.0
    for bad in ("-0.1", "nan", "inf"):
        with pytest.raises(LangpruneError, match="ria_alpha must be a finite number >= 0") as e:
            Config.from_overrides({"ria_alpha": bad})
        assert "\n" not in str(e.value)


def test_prune_stage_passes_ria_alpha_to_the_pruner():
    windows = tiny_windows(4)
    weights = {}
    for alpha in ("0", "0.5"):
        cfg = Config.from_overrides({"method": "ria", "ria_alpha": alpha, "device": "cpu",
                                     "capture_batch_size": "2"})
        model = tiny_model("llama")
        result = stages.prune(cfg, model, windows, CPU, progress=False)
        assert result.method == "ria"
        weights[alpha] = model.model.layers[1].mlp.up_proj.weight.detach().clone()
        ref = tiny_model("llama")
        prune_layerwise(ref, windows, RIAPruner(float(alpha)), SparsityTarget(0.5), device=CPU,
                        batch_size=2, progress=False)
        assert torch.equal(weights[alpha], ref.model.layers[1].mlp.up_proj.weight)
    assert not torch.equal(weights["0"], weights["0.5"])  # the option really arrives
