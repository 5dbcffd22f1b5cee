"""Golden and property tests of the per-matrix pruning functions, statistics and registry."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from pipeline.config import METHODS
from pipeline.errors import LangpruneError
from pipeline.pruners import (
    PRUNERS,
    ColumnSquares,
    Hessian,
    SparsityTarget,
    magnitude_prune,
    make_pruner,
    sparsegpt_prune,
    wanda_prune,
)
from pipeline.pruners import masks as masks_mod
from pipeline.pruners import sparsegpt as sparsegpt_mod
from pipeline.pruners.masks import lowest_in_matrix, lowest_per_row, prune_count


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.T @ x / x.shape[0]


# ---- golden cases -------------------------------------------------------------------------


def test_wanda_compares_within_rows_not_the_whole_matrix():
    # Row 0 is small everywhere: per-matrix Wanda would prune all of it, per-row half of each.
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    _, mask = wanda_prune(w, torch.ones(4), 0.5)
    assert mask.tolist() == [[True, True, False, False], [True, True, False, False]]
    per_matrix = lowest_in_matrix(w.abs(), 0.5)
    assert per_matrix.tolist() == [[True, True, True, True], [False, False, False, False]]


def test_wanda_uses_the_norm_not_the_squared_norm():
    # |W| * ||X||   = [4, 3, 6, 10]   -> the lowest is column 1.
    # |W| * ||X||^2 = [4, 9, 18, 100] -> the lowest would be column 0.
    w = torch.tensor([[4.0, 1.0, 2.0, 1.0]])
    norms = torch.tensor([1.0, 3.0, 3.0, 10.0])
    pruned, mask = wanda_prune(w, norms, 0.25)
    assert mask.tolist() == [[False, True, False, False]]
    squared = torch.argmin(w.abs() * norms**2).item()
    assert squared == 0  # the |W| * ||X||^2 variant would prune column 0 instead
    assert pruned.tolist() == [[4.0, 0.0, 2.0, 1.0]]


def test_wanda_golden_1x8():
    w = torch.tensor([[8.0, -1.0, 3.0, 0.5, -6.0, 2.0, 1.0, -4.0]])
    norms = torch.tensor([0.1, 10.0, 1.0, 4.0, 1.0, 0.25, 3.0, 1.0])
    # scores 0.8, 10, 3, 2, 6, 0.5, 3, 4 -> lowest: cols 5, 0, 3, then col 2 (tied with col 6)
    _, mask = wanda_prune(w, norms, 0.5)
    assert mask.nonzero()[:, 1].tolist() == [0, 2, 3, 5]


def test_magnitude_compares_the_whole_matrix():
    w = torch.tensor([[1.0, -2.0, 3.0, 4.0], [-10.0, 20.0, 30.0, 0.5]])
    pruned, mask = magnitude_prune(w, 0.5)
    assert mask.tolist() == [[True, True, True, False], [False, False, False, True]]
    assert pruned.tolist() == [[0.0, 0.0, 0.0, 4.0], [-10.0, 20.0, 30.0, 0.0]]


def test_ties_go_to_the_lower_index_deterministically():
    w = torch.ones(3, 8)  # all tied, like dequantised 4-bit weights
    _, m_mag = magnitude_prune(w, 0.5)
    assert m_mag.reshape(-1).nonzero().reshape(-1).tolist() == list(range(12))
    _, m_wanda = wanda_prune(w, torch.ones(8), 0.25)
    assert m_wanda.tolist() == [[True, True] + [False] * 6] * 3
    q = torch.randint(-3, 4, (64, 64)).float()  # many exact ties and zeros
    first, second = (wanda_prune(q, torch.ones(64), 0.5)[1] for _ in range(2))
    assert torch.equal(first, second)


@pytest.mark.parametrize("seed", range(5))
def test_selection_equals_the_first_k_of_a_stable_sort(seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (6, 40), generator=gen).float()  # heavy ties
    for sparsity in (0.1, 0.5, 0.9):
        k = prune_count(40, sparsity)
        order = torch.argsort(scores, dim=1, stable=True)[:, :k]
        expected = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)
        assert torch.equal(lowest_per_row(scores, sparsity), expected)
        flat = torch.argsort(scores.reshape(-1), stable=True)[: prune_count(240, sparsity)]
        expected = torch.zeros(240, dtype=torch.bool).index_fill_(0, flat, True).reshape(6, 40)
        assert torch.equal(lowest_in_matrix(scores, sparsity), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_selection_fast_path_equals_kthvalue_with_ties_and_signed_zeros(dtype):
    """The numpy selection used on the CPU gives the masks of the tensor-op path (kthvalue),
    which is the path on accelerators, and both equal the first k of a stable sort."""
    gen = torch.Generator().manual_seed(7)
    scores = torch.randint(-2, 3, (32, 48), generator=gen).to(dtype)
    scores[scores == 0] = torch.tensor([-0.0, 0.0], dtype=dtype).repeat(24 * 32)[
        : int((scores == 0).sum())]
    for k in (1, 7, 24, 47):
        assert torch.equal(masks_mod._lowest(scores, k, dim=-1),
                           masks_mod._lowest_torch(scores, k, dim=-1))
        flat = scores.reshape(-1)
        assert torch.equal(masks_mod._lowest(flat, 5 * k, dim=0),
                           masks_mod._lowest_torch(flat, 5 * k, dim=0))
        grouped = scores.reshape(32, 12, 4)  # the N:M layout, selection on the last axis
        assert torch.equal(masks_mod._lowest(grouped, k % 3 + 1, dim=-1),
                           masks_mod._lowest_torch(grouped, k % 3 + 1, dim=-1))
        order = torch.argsort(scores.float(), dim=1, stable=True)[:, :k]
        expected = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)
        assert torch.equal(masks_mod._lowest(scores, k, dim=-1), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_negative_scores_select_on_their_bits_as_the_values_would(dtype):
    """Non-negative scores (every pruner's) are partitioned as integers: the masks equal the
    tensor path's and a stable sort's, with ties, zeros, subnormals and +inf; a -0.0 or any
    negative value sends the selection back to the float path."""
    gen = torch.Generator().manual_seed(11)
    tiny = torch.finfo(dtype).tiny
    values = torch.tensor([0.0, tiny / 4, tiny, 1e-3, 0.5, 0.5, 1.0, 3.0, float("inf")],
                          dtype=dtype)
    scores = values[torch.randint(0, len(values), (40, 64), generator=gen)]
    scores[:20] = torch.rand(20, 64, generator=gen, dtype=dtype)  # rows without ties
    assert masks_mod._as_ordered_ints(scores.numpy()).dtype.kind == "i"
    for k in (1, 13, 32, 63):
        order = torch.argsort(scores, dim=1, stable=True)[:, :k]
        expected = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)
        assert torch.equal(masks_mod._lowest(scores, k, dim=-1), expected)
        assert torch.equal(masks_mod._lowest_torch(scores, k, dim=-1), expected)
        grouped = scores.reshape(40, 16, 4)
        assert torch.equal(masks_mod._lowest(grouped, k % 3 + 1, dim=-1),
                           masks_mod._lowest_torch(grouped, k % 3 + 1, dim=-1))
    signed = scores.clone()
    signed[0, 0] = -0.0
    assert masks_mod._as_ordered_ints(signed.numpy()).dtype.kind == "f"
    assert torch.equal(masks_mod._lowest(signed, 32, dim=-1),
                       masks_mod._lowest_torch(signed, 32, dim=-1))


# ---- exact sparsity -------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.1, 0.29, 0.5, 0.7])
def test_exact_sparsity_per_row_wanda_and_per_matrix_magnitude(sparsity):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(7, 100, generator=gen)
    _, mask = wanda_prune(w, torch.rand(100, generator=gen), sparsity)
    expected = math.floor(sparsity * 100 + 1e-6)
    assert mask.sum(dim=1).tolist() == [expected] * 7
    _, mask = magnitude_prune(w, sparsity)
    assert int(mask.sum()) == math.floor(sparsity * 700 + 1e-6)
    assert int(mask.sum(dim=1).max()) != int(mask.sum(dim=1).min())  # not per row


def test_prune_count_is_robust_to_float_error():
    assert prune_count(100, 0.29) == 29  # 0.29 * 100 = 28.999999999999996
    assert prune_count(10, 0.0) == 0 and prune_count(7, 0.5) == 3


@pytest.mark.parametrize("blocksize", [16, 24])
def test_exact_sparsity_per_block_sparsegpt(blocksize):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(10, 56, generator=gen)
    x = torch.randn(200, 56, generator=gen)
    res = sparsegpt_prune(w, _hessian(x), 0.5, blocksize=blocksize)
    for i1 in range(0, 56, blocksize):
        block = res.mask[:, i1 : i1 + blocksize]
        assert int(block.sum()) == math.floor(0.5 * block.numel())
    assert torch.all(res.weight[res.mask] == 0)
    assert res.damp_retries == 0 and res.loss > 0


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 3)])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_exact_n_of_m_structure(method, n, m):
    gen = torch.Generator().manual_seed(3)
    cols = 48
    w = torch.randn(6, cols, generator=gen)
    x = torch.randn(100, cols, generator=gen)
    if method == "magnitude":
        pruned, mask = magnitude_prune(w, n / m, n, m)
    elif method == "wanda":
        pruned, mask = wanda_prune(w, x.norm(dim=0), n / m, n, m)
    else:
        res = sparsegpt_prune(w, _hessian(x), n / m, n, m, blocksize=12 if m != 8 else 16)
        pruned, mask = res.weight, res.mask
    groups = mask.reshape(6, cols // m, m).sum(dim=-1)
    assert torch.all(groups == n)
    assert torch.all(pruned[mask] == 0)
    if method != "sparsegpt":
        assert torch.equal(pruned[~mask], w[~mask])


def test_sparsegpt_matches_the_reference_algorithm():
    """Our blocked implementation equals a direct transcription of the SparseGPT reference."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(12, 40, generator=gen, dtype=torch.float64).float()
    x = torch.randn(300, 40, generator=gen) @ torch.randn(40, 40, generator=gen)
    h = _hessian(x)
    ours = sparsegpt_prune(w, h, 0.5, blocksize=16)
    ref_w, ref_mask = _reference_sparsegpt(w, h, 0.5, blocksize=16)
    assert torch.equal(ours.mask, ref_mask)
    torch.testing.assert_close(ours.weight, ref_w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n,m", [(0, 0), (2, 4), (1, 3)])
def test_sparsegpt_nested_lazy_updates_equal_per_column_updates(monkeypatch, n, m):
    """Sub-blocks inside a block (SUBBLOCK) change only the order of float32 sums: the masks
    equal those of per-column updates over the whole block (and of the reference)."""
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(48, 240, generator=gen)
    h = _hessian(torch.randn(600, 240, generator=gen) @ torch.randn(240, 240, generator=gen))
    sparsity = n / m if m else 0.5
    assert sparsegpt_mod.SUBBLOCK < 120  # the nested path runs
    nested = sparsegpt_prune(w, h, sparsity, n, m, blocksize=120)
    monkeypatch.setattr(sparsegpt_mod, "SUBBLOCK", 120)  # one sub-block = the whole block
    flat = sparsegpt_prune(w, h, sparsity, n, m, blocksize=120)
    assert torch.equal(nested.mask, flat.mask)
    torch.testing.assert_close(nested.weight, flat.weight, atol=1e-5, rtol=1e-4)
    assert nested.loss == pytest.approx(flat.loss, rel=1e-4)
    if not m:
        ref_w, ref_mask = _reference_sparsegpt(w, h, 0.5, blocksize=120)
        assert torch.equal(nested.mask, ref_mask)
        torch.testing.assert_close(nested.weight, ref_w, atol=1e-5, rtol=1e-4)


def _reference_sparsegpt(W, H, sparsity, blocksize, percdamp=0.01):
    # Transcribed from IST-DASLab/sparsegpt sparsegpt.py fasterprune (unstructured path);
    # continuous random data has no ties, so a threshold mask is exact.
    W, H = W.clone(), H.clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    H[torch.arange(cols), torch.arange(cols)] += damp
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    M = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
        # The original indexes [int(numel * sparsity)] and keeps "<=", pruning one weight more
        # than the target per block; docs/science.md#sparsegpt asks for the exact count,
        # hence "- 1" here.
        thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity) - 1]
        mask1 = tmp <= thresh
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        M[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W, M


def test_sparsegpt_zero_sparsity_keeps_the_weight():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(4, 16, generator=gen)
    res = sparsegpt_prune(w, _hessian(torch.randn(50, 16, generator=gen)), 0.0)
    assert not res.mask.any() and torch.equal(res.weight, w) and res.loss == 0


# ---- reconstruction quality ------------------------------------------------------------------


def _correlated_inputs(gen: torch.Generator, tokens: int, d: int) -> torch.Tensor:
    mix = torch.randn(d, d, generator=gen) / math.sqrt(d) + torch.eye(d)
    scales = torch.ones(d)
    scales[torch.randperm(d, generator=gen)[: d // 16]] = 20.0  # outlier features
    return (torch.randn(tokens, d, generator=gen) @ mix) * scales


def test_reconstruction_error_sparsegpt_lt_wanda_lt_magnitude():
    errors = {"magnitude": 0.0, "wanda": 0.0, "sparsegpt": 0.0}
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        x = _correlated_inputs(gen, 512, 64)
        w = torch.randn(48, 64, generator=gen)
        ref = x @ w.T
        pruned = {
            "magnitude": magnitude_prune(w, 0.5)[0],
            "wanda": wanda_prune(w, x.norm(dim=0), 0.5)[0],
            "sparsegpt": sparsegpt_prune(w, _hessian(x), 0.5, blocksize=32).weight,
        }
        for name, wp in pruned.items():
            errors[name] += float((ref - x @ wp.T).norm() / ref.norm()) / 4
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


# ---- robustness -----------------------------------------------------------------------------


def test_sparsegpt_dead_inputs_get_zero_weight_columns():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(100, 16, generator=gen)
    x[:, [3, 9]] = 0.0  # inputs that never fire
    w = torch.randn(8, 16, generator=gen)
    res = sparsegpt_prune(w, _hessian(x), 0.25, blocksize=8)
    assert torch.all(res.weight[:, [3, 9]] == 0)
    assert torch.all(res.mask[:, [3, 9]])  # zero score: they are pruned first
    assert torch.isfinite(res.weight).all()


def test_sparsegpt_raises_damping_and_retries(caplog):
    h = torch.tensor([[1.0, 2.5], [2.5, 1.0]])  # eigenvalues 3.5 and -1.5: needs damping > 1.5
    w = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    with caplog.at_level(logging.WARNING, logger="pipeline.pruners.sparsegpt"):
        res = sparsegpt_prune(w, h, 0.5)
    assert res.damp_retries == 3  # damping 0.01 -> 0.1 -> 1 -> 10
    assert "Cholesky failed" in caplog.text
    with pytest.raises(LangpruneError, match="Cholesky failed"):
        sparsegpt_prune(w, -1e12 * torch.eye(2), 0.5)


@pytest.mark.parametrize(
    "call",
    [
        lambda w: magnitude_prune(w, 1.0),
        lambda w: magnitude_prune(w, -0.1),
        lambda w: magnitude_prune(w, float("nan")),
        lambda w: wanda_prune(w, torch.ones(8), 0.5, 4, 2),
        lambda w: wanda_prune(w, torch.ones(8), 0.5, 2, 2),
        lambda w: magnitude_prune(w, 0.6, 2, 4),
        lambda w: wanda_prune(w, torch.ones(7), 0.5),
        lambda w: magnitude_prune(w[:, :6], 0.25, 1, 4),
        lambda w: sparsegpt_prune(w, torch.eye(8), 0.5, 2, 4, blocksize=6),
    ],
)
def test_bad_targets_and_shapes_are_clear_errors(call):
    with pytest.raises(LangpruneError):
        call(torch.randn(4, 8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_and_statistics_are_errors(bad):
    w = torch.randn(4, 8)
    w_bad = w.clone()
    w_bad[1, 2] = bad
    with pytest.raises(LangpruneError, match="NaN or Inf"):
        magnitude_prune(w_bad, 0.5)
    norms = torch.ones(8)
    norms[3] = bad
    with pytest.raises(LangpruneError, match="NaN or Inf"):
        wanda_prune(w, norms, 0.5)
    h = torch.eye(8)
    h[0, 1] = bad
    with pytest.raises(LangpruneError, match="NaN or Inf"):
        sparsegpt_prune(w, h, 0.5)


def test_sparsity_target_validation():
    assert SparsityTarget.from_pattern(0.5, "2:4") == SparsityTarget(0.5, 2, 4)
    for args in [(0.5, 4, 2), (0.6, 2, 4), (1.0, 0, 0), (0.5, 0, 4)]:
        with pytest.raises(LangpruneError):
            SparsityTarget(*args)
    with pytest.raises(LangpruneError, match="malformed pattern"):
        SparsityTarget.from_pattern(0.5, "2-4")


# ---- statistics and registry ----------------------------------------------------------------


def test_statistics_accumulate_in_float32_over_batches():
    gen = torch.Generator().manual_seed(7)
    batches = [torch.randn(2, 5, 6, generator=gen).to(torch.bfloat16) for _ in range(3)]
    flat = torch.cat([b.reshape(-1, 6) for b in batches]).float()
    sq, hess = ColumnSquares(6, torch.device("cpu")), Hessian(6, torch.device("cpu"))
    for b in batches:
        sq.add_batch(b)
        hess.add_batch(b)
    torch.testing.assert_close(sq.col_norms(), flat.norm(dim=0))
    torch.testing.assert_close(hess.hessian(), 2 * flat.T @ flat / 6)  # N = 6 windows
    assert sq.sum_sq.dtype == hess.xtx.dtype == torch.float32
    assert (sq.n_tokens, hess.n_windows) == (30, 6)


@pytest.mark.parametrize("d", [600, 768, 1029])
def test_blocked_symmetric_hessian_equals_the_full_product(d):
    """Upper blocks only, mirrored when read: the full X^T X, exactly symmetric, and the
    statistic keeps accumulating correctly after it has been read once."""
    gen = torch.Generator().manual_seed(d)
    mix = torch.randn(d, d, generator=gen) / d**0.5  # correlated features, like activations
    batches = [torch.randn(3, 40, d, generator=gen) @ mix for _ in range(3)]
    hess = Hessian(d, torch.device("cpu"))
    assert d >= 2 * Hessian.SYM_BLOCK  # the blocked path, not the single-GEMM one
    for i, b in enumerate(batches):
        hess.add_batch(b)
        flat = torch.cat([x.reshape(-1, d) for x in batches[: i + 1]]).double()
        full = (2 * flat.T @ flat / (3 * (i + 1))).float()
        got = hess.hessian()
        assert torch.equal(got, got.T)
        torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4)
    x = torch.cat([b.reshape(-1, d) for b in batches])
    w = torch.randn(64, d, generator=gen)
    exact = sparsegpt_prune(w, (2 * x.double().T @ x.double() / 9).float(), 0.5).mask
    blocked = sparsegpt_prune(w, hess.hessian(), 0.5).mask
    plain = sparsegpt_prune(w, 2 * x.T @ x / 9, 0.5).mask
    # Masks against the float64 Hessian's: the blocked float32 sum is about as close as the
    # plain float32 product (near-ties flip with rounding; either flips up to ~0.6%).
    agree_blocked = (blocked == exact).float().mean().item()
    agree_plain = (plain == exact).float().mean().item()
    assert agree_blocked > 0.99 and agree_blocked >= agree_plain - 0.002, (
        agree_blocked, agree_plain)


def test_registry_lists_known_methods_on_unknown_name():
    assert PRUNERS.names() == sorted(METHODS)
    with pytest.raises(LangpruneError, match="known: magnitude, ria, sparsegpt, wanda"):
        make_pruner("wandaa")
    sg = make_pruner("sparsegpt", sparsegpt_blocksize=64, sparsegpt_percdamp=0.05)
    assert (sg.blocksize, sg.percdamp) == (64, 0.05)
    assert not make_pruner("magnitude").needs_calibration


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_zero_where_equals_masked_fill_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(33, 70, generator=gen).to(dtype)
    w[0, :5] = torch.tensor([-0.0, 0.0, float("inf"), -float("inf"), float("nan")]).to(dtype)
    mask = torch.rand(33, 70, generator=gen) < 0.5
    before = w.view(torch.uint8).clone()
    got, ref = masks_mod.zero_where(w, mask), w.masked_fill(mask, 0)
    assert got.dtype == dtype and got.shape == w.shape
    # bit for bit: +0.0 where pruned (never -0.0), kept entries untouched, NaN included
    assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))
    assert torch.equal(w.view(torch.uint8), before)  # the input is not modified
    t = w.t()  # a non-contiguous weight is handled too
    assert torch.equal(masks_mod.zero_where(t, mask.t()).view(torch.uint8),
                       t.masked_fill(mask.t(), 0).contiguous().view(torch.uint8))


def test_all_finite_agrees_with_isfinite_even_when_the_sum_overflows():
    w = torch.randn(64, 64)
    assert masks_mod.all_finite(w)
    for bad in (float("nan"), float("inf"), -float("inf")):
        v = w.clone()
        v[7, 9] = bad
        assert not masks_mod.all_finite(v)
    big = torch.full((4, 4), 3e38)  # finite, but its float32 sum would overflow
    huge = torch.full((4, 4), 1e308, dtype=torch.float64)  # its float64 sum overflows
    assert masks_mod.all_finite(big) and masks_mod.all_finite(huge)
    assert not masks_mod.all_finite(torch.tensor([1.0, float("nan")]).bfloat16())
    assert masks_mod.all_finite(torch.arange(5))  # integer tensors are finite


def test_count_true_agrees_with_count_nonzero_on_signed_zeros_and_nan():
    w = torch.randn(33, 17)
    w[w.abs() < 0.3] = 0.0
    w[0, :4] = -0.0  # a negative zero is a zero
    w[1, 2], w[2, 3] = float("nan"), float("inf")  # both are non-zero
    for t in (w, w.double(), w.half(), w.bfloat16(), w > 0):
        assert masks_mod.count_true(t) == int(torch.count_nonzero(t)), t.dtype


def test_taking_the_hessian_factors_the_same_without_a_copy():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 64, 40, generator=gen)
    x[..., 3] = 0.0  # a dead input
    stat = Hessian(40, torch.device("cpu"))
    stat.add_batch(x)
    expected = stat.hessian()
    copied = sparsegpt_mod.factor_hessian(expected, 0.01)
    assert torch.equal(expected, stat.hessian())  # the copying path leaves its input alone
    taken = stat.take_hessian()
    assert torch.equal(taken, expected) and stat.xtx.numel() == 0
    in_place = sparsegpt_mod.factor_hessian(taken, 0.01, overwrite=True)
    assert torch.equal(in_place.upper, copied.upper) and torch.equal(in_place.dead, copied.dead)
    with pytest.raises(RuntimeError, match="takes no batches"):
        stat.add_batch(x)
    with pytest.raises(RuntimeError, match="already called"):
        stat.take_hessian()
    stat.release()
    assert stat.xtx.numel() == 0 and stat.derived == {}


# ---- factorisation from matrix products (pipeline/pruners/linalg.py) ---------------------------


def _spd(d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * d, d, generator=gen) @ (torch.randn(d, d, generator=gen) / d**0.5)
    return x.T @ x / (4 * d) + 0.01 * torch.eye(d)


@pytest.mark.parametrize("d", [5, 128, 129, 300, 700])
def test_product_based_factor_equals_lapack(d):
    from pipeline.pruners import linalg

    h = _spd(d, d)
    low, info = linalg.blocked_cholesky(h)
    assert info == 0
    torch.testing.assert_close(low, torch.linalg.cholesky(h), rtol=1e-4, atol=1e-5)
    lt = torch.linalg.cholesky(h)
    torch.testing.assert_close(linalg.lower_triangular_inverse(lt) @ lt, torch.eye(d),
                               rtol=1e-4, atol=1e-4)
    upper, info = linalg.upper_factor_of_inverse(h)
    ref = torch.linalg.cholesky(torch.cholesky_inverse(lt), upper=True)
    assert info == 0 and torch.equal(upper, upper.triu()) and bool((upper.diagonal() > 0).all())
    torch.testing.assert_close(upper, ref, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(upper.T @ upper, torch.linalg.inv(h.double()).float(),
                               rtol=1e-3, atol=1e-3)


def test_product_based_factor_reports_an_indefinite_matrix_like_lapack():
    from pipeline.pruners import linalg

    h = _spd(300, 1)
    h[200, 200] = -5.0
    _, info = linalg.blocked_cholesky(h)
    assert info == int(torch.linalg.cholesky_ex(h).info) > 0
    assert linalg.upper_factor_of_inverse(h)[1] > 0  # flipped: another order, still refused


def test_sparsegpt_with_either_factorisation_gives_the_same_result(monkeypatch):
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(96, 384, generator=gen)
    h = _spd(384, 2)
    ours = sparsegpt_prune(w, h, 0.5)
    ref = sparsegpt_prune(w, h, 0.5, factor="lapack")
    agree = (ours.mask == ref.mask).float().mean().item()
    assert agree > 0.999, agree  # float32 rounding flips at most a few near-ties
    assert ours.mask.sum() == ref.mask.sum()  # exact sparsity either way
    assert abs(ours.loss - ref.loss) <= 1e-3 * ref.loss
