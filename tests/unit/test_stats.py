"""Intervals, paired comparisons and verdicts against textbook values and constructed cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis.paired import (
    align_documents,
    cluster_paired_bootstrap,
    paired_accuracy,
    paired_perplexity,
)
from analysis.stats import (
    accuracy_interval,
    bits_per_byte_interval,
    classify,
    fmt_interval,
    headline,
    is_informative,
    perplexity_interval,
    wilson_interval,
)
from pipeline.errors import LangpruneError


def table_outcomes(both: int, a_only: int, b_only: int, neither: int):
    """Per-document outcomes of two runs with the given paired 2x2 counts."""
    a = [1] * both + [1] * a_only + [0] * b_only + [0] * neither
    b = [1] * both + [0] * a_only + [1] * b_only + [0] * neither
    return np.array(a, dtype=bool), np.array(b, dtype=bool)


def windows(n: int, seed: int = 1):
    """n windows of 128 tokens with per-token NLL varying around 3 nats between windows."""
    rng = np.random.default_rng(seed)
    tokens = np.full(n, 128.0)
    return rng.normal(3.0, 0.3, n) * tokens, tokens


# --- Wilson and informativeness ------------------------------------------------------------


@pytest.mark.parametrize(
    "k, n, low, high",
    [
        (8, 10, 0.4902, 0.9433),  # the commonly tabulated 95% Wilson interval for 8/10
        (81, 263, 0.2553, 0.3662),  # Newcombe (1998a) worked example, method 3 (Wilson)
    ],
)
def test_wilson_matches_published_values(k, n, low, high):
    assert wilson_interval(k, n, z=1.96) == pytest.approx((low, high), abs=5e-5)


def test_wilson_zero_successes_by_hand():
    # k = 0: low = 0 and high = z^2 / (n + z^2)
    z = 1.959964
    assert wilson_interval(0, 10) == pytest.approx((0.0, z * z / (10 + z * z)))
    assert wilson_interval(10, 10)[1] == 1.0


@pytest.mark.parametrize("k, n", [(0, 0), (3, 2), (-1, 5)])
def test_wilson_refuses_impossible_counts(k, n):
    with pytest.raises(LangpruneError):
        wilson_interval(k, n)


def test_accuracy_interval_from_outcomes():
    ival = accuracy_interval([1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
    assert ival.value == 0.8 and ival.n == 10 and ival.method == "wilson"
    assert (ival.low, ival.high) == pytest.approx(wilson_interval(8, 10))
    assert ival.confidence == pytest.approx(0.95, abs=1e-6)
    with pytest.raises(LangpruneError):
        accuracy_interval([1, 2, 0])


def test_informative_only_above_chance():
    # 30/100 on a four-choice task: Wilson (0.219, 0.396) contains 0.25
    assert not is_informative(30, 100, chance=0.25)
    assert is_informative(60, 100, chance=0.25)
    # significantly *below* chance is no evidence either (SCIENCE.md: above chance)
    assert not is_informative(5, 100, chance=0.5)


# --- verdicts --------------------------------------------------------------------------


def test_classify_directions_and_touching_null():
    assert classify(0.01, 0.05, higher_is_better=True) == "better"
    assert classify(-0.05, -0.01, higher_is_better=True) == "worse"
    assert classify(0.01, 0.05, higher_is_better=False) == "worse"
    assert classify(0.0, 0.05, higher_is_better=True) == "indistinguishable"  # touches 0
    assert classify(-0.05, 0.0, higher_is_better=True) == "indistinguishable"
    assert classify(0.90, 0.97, higher_is_better=False, null=1.0) == "better"
    assert classify(0.90, 1.00, higher_is_better=False, null=1.0) == "indistinguishable"
    with pytest.raises(LangpruneError):
        classify(0.2, 0.1, higher_is_better=True)


# --- paired accuracy -------------------------------------------------------------------


def test_newcombe_paired_interval_matches_textbook():
    # Cavo et al. 2012 in Fagerland, Lydersen & Laake (2017), ch. 8: table [[59, 6], [16, 80]],
    # Newcombe square-and-add estimate -0.0621, 95% CI -0.1186 to -0.0046.
    res = paired_accuracy(*table_outcomes(59, 6, 16, 80))
    d = res.difference
    assert d.estimate == pytest.approx(-10 / 161)
    assert d.low == pytest.approx(-0.1186, abs=5e-5)
    assert d.high == pytest.approx(-0.0046, abs=5e-5)
    assert d.verdict == "worse" and d.n == 161
    assert (res.a_only, res.b_only) == (6, 16)
    assert res.acc_a == pytest.approx(65 / 161) and res.acc_b == pytest.approx(75 / 161)


def test_mcnemar_exact_p_equals_binomial_by_hand():
    res = paired_accuracy(*table_outcomes(59, 6, 16, 80))
    # two-sided exact: 2 * P(X <= 6), X ~ Binomial(22, 1/2)
    by_hand = 2 * sum(math.comb(22, i) for i in range(7)) / 2**22
    assert res.mcnemar_p == pytest.approx(by_hand, rel=1e-12)
    assert res.mcnemar_p == pytest.approx(0.0525, abs=1e-4)


def test_identical_runs_are_indistinguishable():
    a, _ = table_outcomes(40, 0, 0, 60)
    res = paired_accuracy(a, a.copy())
    assert res.difference.estimate == 0.0
    assert res.difference.low < 0 < res.difference.high  # no zero-width overclaim
    assert res.difference.verdict == "indistinguishable"
    assert res.mcnemar_p == 1.0


def test_large_accuracy_difference_has_the_right_sign():
    a, b = table_outcomes(50, 40, 2, 8)
    assert paired_accuracy(a, b).difference.verdict == "better"
    assert paired_accuracy(b, a).difference.verdict == "worse"
    assert paired_accuracy(b, a).difference.estimate == pytest.approx(-0.38)


def test_paired_accuracy_refuses_unpaired_lengths():
    with pytest.raises(LangpruneError, match="different documents"):
        paired_accuracy([1, 0, 1], [1, 0])


# --- perplexity ------------------------------------------------------------------------


def test_perplexity_point_estimate_and_coverage():
    nll, tok = windows(200)
    ival = perplexity_interval(nll, tok)
    assert ival.value == pytest.approx(math.exp(nll.sum() / tok.sum()))
    assert ival.low < ival.value < ival.high
    assert ival.n == 200 and ival.confidence == 0.95


def test_perplexity_interval_shrinks_as_one_over_sqrt_n():
    nll, tok = windows(100)
    w1 = perplexity_interval(nll, tok)
    w4 = perplexity_interval(np.tile(nll, 4), np.tile(tok, 4))
    assert w4.value == pytest.approx(w1.value)
    ratio = (w1.high - w1.low) / (w4.high - w4.low)
    assert ratio == pytest.approx(2.0, rel=0.15)  # 4x the windows -> half the width


def test_bootstrap_is_seeded():
    nll, tok = windows(50)
    assert perplexity_interval(nll, tok, seed=7) == perplexity_interval(nll, tok, seed=7)
    assert perplexity_interval(nll, tok, seed=7) != perplexity_interval(nll, tok, seed=8)


def test_bits_per_byte_definition():
    n_bytes = np.array([100.0, 300.0, 50.0])
    ival = bits_per_byte_interval(math.log(2) * n_bytes * 1.5, n_bytes)  # 1.5 bits per byte
    assert (ival.value, ival.low, ival.high) == pytest.approx((1.5, 1.5, 1.5))


def test_paired_perplexity_identical_runs_degenerate_at_one():
    nll, tok = windows(80)
    res = paired_perplexity(nll, nll.copy(), tok)
    assert (res.ratio.estimate, res.ratio.low, res.ratio.high) == (1.0, 1.0, 1.0)
    assert res.ratio.verdict == "indistinguishable"
    assert res.ppl_a == res.ppl_b


def test_paired_perplexity_clear_difference():
    nll, tok = windows(80)
    worse = nll + 0.1 * tok  # b pays 0.1 nat more per token: ratio a/b = exp(-0.1)
    res = paired_perplexity(nll, worse, tok)
    assert res.ratio.estimate == pytest.approx(math.exp(-0.1))
    assert res.ratio.high < 1 and res.ratio.verdict == "better"
    assert paired_perplexity(worse, nll, tok).ratio.verdict == "worse"


def test_paired_bootstrap_is_tighter_than_unpaired_intervals():
    # The windows vary a lot, the runs differ little but consistently: pairing resolves it
    # although the two perplexity intervals overlap.
    nll, tok = windows(80)
    extra = np.random.default_rng(2).normal(0.01, 0.01, 80)  # nats per token, b over a
    res = paired_perplexity(nll, nll + extra * tok, tok)
    assert res.ppl_a.high > res.ppl_b.low  # unpaired intervals overlap
    assert res.ratio.verdict == "better"


# --- two-level bootstrap -----------------------------------------------------------------


def test_cluster_bootstrap_wider_when_sets_vary():
    rng = np.random.default_rng(3)
    docs = rng.normal(0.0, 1.0, 300)  # document difficulty, shared by both configurations
    set_effect = np.array([[-0.3], [0.05], [0.35]])  # calibration set moves a's scores
    a = docs + set_effect + 0.1 + rng.normal(0, 0.05, (3, 300))
    b = docs + rng.normal(0, 0.05, (3, 300))
    two = cluster_paired_bootstrap(a, b, higher_is_better=True)
    one = cluster_paired_bootstrap(a, b, higher_is_better=True, resample_sets=False)
    assert two.estimate == pytest.approx(np.mean(a - b)) == one.estimate
    assert two.n_sets == 3 and two.n == 300
    assert (two.high - two.low) > 5 * (one.high - one.low)
    assert one.verdict == "better"  # documents alone would claim a win...
    assert two.verdict == "indistinguishable"  # ...that the set-to-set spread does not support


def test_cluster_bootstrap_identical_and_clear_cases():
    rng = np.random.default_rng(4)
    a = (rng.random((3, 200)) < 0.6).astype(float)
    same = cluster_paired_bootstrap(a, a.copy(), higher_is_better=True)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)
    assert same.verdict == "indistinguishable"
    nll = rng.normal(3.0, 0.3, (3, 200))
    res = cluster_paired_bootstrap(nll, nll + 0.2, higher_is_better=False)
    assert res.verdict == "better" and res.estimate == pytest.approx(-0.2)
    with pytest.raises(LangpruneError):
        cluster_paired_bootstrap(a, a[:, :10], higher_is_better=True)


# --- document alignment -----------------------------------------------------------------


def outcomes(doc_ids, correct):
    return pd.DataFrame(
        {"task": "xnli", "lang": "de", "doc_id": doc_ids, "correct": correct, "run": "x"}
    )


def test_alignment_refuses_different_documents():
    a = outcomes([0, 1, 2, 3], [1, 0, 1, 1])
    b = outcomes([1, 2, 3, 4, 5], [1, 1, 0, 0, 1])
    with pytest.raises(LangpruneError, match="1 only in a, 2 only in b, 3 shared") as err:
        align_documents(a, b)
    assert "\n" not in str(err.value)


def test_alignment_common_restricts_and_pairs_rows():
    a = outcomes([3, 0, 1, 2], [1, 1, 0, 1])
    b = outcomes([5, 2, 1, 4, 3], [1, 0, 1, 0, 1])
    al = align_documents(a, b, mode="common")
    assert (al.n_common, al.dropped_a, al.dropped_b) == (3, 1, 2)
    assert al.a["doc_id"].tolist() == al.b["doc_id"].tolist() == [1, 2, 3]
    assert al.a["correct"].tolist() == [0, 1, 1] and al.b["correct"].tolist() == [1, 0, 1]


def test_alignment_same_documents_in_other_order_pass_refuse():
    a = outcomes([2, 0, 1], [1, 0, 0])
    al = align_documents(a, outcomes([0, 1, 2], [1, 1, 1]))
    assert al.a["doc_id"].tolist() == [0, 1, 2] and al.a["correct"].tolist() == [0, 0, 1]
    assert (al.dropped_a, al.dropped_b) == (0, 0)


def test_alignment_refuses_duplicates_and_bad_mode():
    a = outcomes([0, 0, 1], [1, 0, 1])
    with pytest.raises(LangpruneError, match="twice"):
        align_documents(a, outcomes([0, 1], [1, 1]), mode="common")
    with pytest.raises(LangpruneError, match="mode"):
        align_documents(a, a, mode="union")  # type: ignore[arg-type]


# --- rendering ----------------------------------------------------------------------------


def test_headline_exact():
    verdicts = ["better"] * 3 + ["worse"] + ["indistinguishable"] * 10 + ["uninformative"] * 4
    assert headline(verdicts) == (
        "target-language calibration is better in 3, worse in 1, indistinguishable in 10 "
        "of 14 cases; 4 uninformative cases not counted"
    )
    assert headline(["worse"], subject="the ru blend") == (
        "the ru blend is better in 0, worse in 1, indistinguishable in 0 of 1 case"
    )
    with pytest.raises(LangpruneError, match="unknown verdicts"):
        headline(["best"])


def test_fmt_interval_is_asymmetric_brackets():
    assert fmt_interval(0.5312, 0.4801, 0.5803) == "0.53 [0.48, 0.58]"
    assert fmt_interval(23.61, 23.1, 24.4, digits=1) == "23.6 [23.1, 24.4]"
