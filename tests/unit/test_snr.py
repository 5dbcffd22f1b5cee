"""SNR of the pruning error: formula, edge cases, streaming, tidy tables."""

from __future__ import annotations

import math

import pytest
import torch

from analysis.snr import SnrAccumulator, mean_snr_by_layer, snr_db, snr_table


def test_identical_outputs_are_infinite():
    y = torch.randn(3, 5, 8)
    assert snr_db(y, y.clone()) == math.inf
    assert snr_db(torch.zeros(4), torch.zeros(4)) == math.inf


def test_zero_signal_with_error_is_minus_infinite():
    assert snr_db(torch.zeros(4), torch.ones(4)) == -math.inf


def test_known_perturbation_matches_formula():
    y = torch.tensor([3.0, 4.0])  # ||Y||^2 = 25
    y_pruned = torch.tensor([3.0, 3.5])  # ||Y - Y'||^2 = 0.25
    assert snr_db(y, y_pruned) == pytest.approx(10 * math.log10(100))  # 20 dB


def test_scaled_perturbation_and_float64_accumulation():
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(64, 128, generator=gen)
    noise = torch.randn(64, 128, generator=gen)
    noise = noise * (y.double().norm() / noise.double().norm() * 1e-2).float()  # 40 dB
    assert snr_db(y, y + noise) == pytest.approx(40.0, abs=1e-3)
    # bfloat16 inputs: the formula on the values as given, no float32-overflow of sums
    y16, p16 = y.bfloat16(), (y + noise).bfloat16()
    expected = 10 * math.log10(
        float((y16.double() ** 2).sum()) / float(((y16.double() - p16.double()) ** 2).sum())
    )
    assert snr_db(y16, p16) == pytest.approx(expected, rel=1e-9)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        snr_db(torch.zeros(3), torch.zeros(4))


def test_accumulator_equals_one_shot_regardless_of_batching():
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(10, 7, generator=gen)
    y_pruned = y + 0.1 * torch.randn(10, 7, generator=gen)
    acc = SnrAccumulator()
    for k in range(0, 10, 3):
        acc.update(y[k : k + 3], y_pruned[k : k + 3])
    assert acc.numel == 70
    assert acc.snr_db == pytest.approx(snr_db(y, y_pruned), rel=1e-12)
    left, right = SnrAccumulator(), SnrAccumulator()
    left.update(y[:4], y_pruned[:4])
    right.update(y[4:], y_pruned[4:])
    left.merge(right)
    assert left.snr_db == pytest.approx(acc.snr_db, rel=1e-12)
    with pytest.raises(ValueError):
        _ = SnrAccumulator().snr_db


def _acc(signal: float, noise: float) -> SnrAccumulator:
    return SnrAccumulator(signal=signal, noise=noise, numel=1)


def test_snr_table_is_tidy_and_pools_sums():
    local = {"en": [_acc(100, 1), _acc(100, 0)], "de": [_acc(100, 10), _acc(10, 1)]}
    accumulated = {"en": [_acc(100, 1), _acc(100, 10)], "de": [_acc(100, 10), _acc(10, 10)]}
    table = snr_table(local, accumulated)
    assert list(table.columns) == ["layer", "eval_lang", "kind", "snr_db", "signal", "noise"]
    assert len(table) == 8
    cell = table[(table.kind == "local") & (table.eval_lang == "en") & (table.layer == 1)]
    assert cell["snr_db"].item() == math.inf
    cell = table[(table.kind == "accumulated") & (table.eval_lang == "de") & (table.layer == 1)]
    assert cell["snr_db"].item() == pytest.approx(0.0)
    pooled = mean_snr_by_layer(table).set_index(["kind", "layer"])
    # local layer 0: (100 + 100) / (1 + 10)
    assert pooled.loc[("local", 0), "snr_db"] == pytest.approx(10 * math.log10(200 / 11))
    assert pooled.loc[("local", 1), "snr_db"] == pytest.approx(10 * math.log10(110 / 1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(4)
    y = torch.randn(8, 33, generator=gen)
    y_pruned = y + 0.05 * torch.randn(8, 33, generator=gen)
    acc = SnrAccumulator()
    acc.update(y.cuda().half(), y_pruned.cuda().half())
    assert acc.snr_db == pytest.approx(snr_db(y.half(), y_pruned.half()), rel=1e-9)
