"""Headline-metric details of the analyses: dropped SNR layers, weight-updating methods, and
the bootstrap intervals of :mod:`analysis.uncertainty`."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis.measure import headline_metrics
from pipeline.pruners import PRUNERS


def _snr(values: list[float]) -> pd.DataFrame:
    rows = []
    for kind in ("local", "accumulated"):
        for layer, v in enumerate(values):
            noise = 0.0 if math.isinf(v) else 10 ** (-v / 10)
            rows.append([layer, "de", kind, v, 1.0, noise])
    return pd.DataFrame(rows, columns=["layer", "eval_lang", "kind", "snr_db", "signal", "noise"])


def test_snr_mean_counts_the_non_finite_layers_it_leaves_out():
    lsar = pd.DataFrame(columns=["eval_lang", "layer", "agnostic", "specific"])
    lape = pd.DataFrame(columns=["lang", "jaccard", "removed_fraction"])
    m = headline_metrics(_snr([10.0, math.inf, 20.0]), lsar, lape, 0.5)
    assert m["snr_local.mean"] == pytest.approx(15.0)
    assert m["snr_local.mean.n_dropped"] == 1.0 and m["snr_acc.mean.n_dropped"] == 1.0
    assert headline_metrics(_snr([10.0, 20.0]), lsar, lape, 0.5)["snr_acc.mean.n_dropped"] == 0


def test_only_sparsegpt_declares_that_it_updates_weights():
    flags = {name: PRUNERS.get(name).updates_weights for name in PRUNERS.names()}
    assert flags.pop("sparsegpt") is True
    assert flags and not any(flags.values())


def _acc(sums: list[tuple[float, float]]):
    import torch

    from analysis.snr import SnrAccumulator

    acc = SnrAccumulator()
    for s, n in sums:  # a window whose dense output has energy s and error energy n
        d = torch.tensor([[math.sqrt(s)]], dtype=torch.float64)
        acc.update(d, d - math.sqrt(n))
    return acc


def test_snr_accumulator_keeps_per_window_sums_that_add_up():
    import torch

    from analysis.snr import SnrAccumulator

    acc = SnrAccumulator()
    y = torch.randn(3, 5, 4)
    acc.update(y, y * 0.9)
    assert len(acc.windows) == 3
    assert sum(s for s, _ in acc.windows) == pytest.approx(acc.signal)
    assert sum(n for _, n in acc.windows) == pytest.approx(acc.noise)


def test_band_snr_intervals_are_seeded_and_bracket_the_pooled_value():
    from analysis import uncertainty as U

    rng = np.random.default_rng(1)
    local = {lang: [_acc([(1.0, float(rng.uniform(0.01, 0.1))) for _ in range(12)])
                    for _ in range(6)] for lang in ("de", "sw")}
    a = U.snr_intervals(local, local, seed=3)
    assert a == U.snr_intervals(local, local, seed=3)
    assert set(U.layer_bands(6)) == {"early", "middle", "late"} and U.layer_bands(2).keys() == {
        "early", "middle"}
    early = [acc for layer in (0, 1) for acc in local["de"][layer:layer + 1]]
    signal = sum(acc.signal for acc in early)
    noise = sum(acc.noise for acc in early)
    assert a["snr_local.band.early.de"] == pytest.approx(10 * math.log10(signal / noise))
    for name in ("snr_acc.band.late.sw", "snr_local.band.middle"):
        assert a[f"{name}.ci95_low"] <= a[name] <= a[f"{name}.ci95_high"]
        assert a[f"{name}.ci95_low"] < a[f"{name}.ci95_high"]


def test_report_counts_own_language_snr_wins_and_ties():
    from analysis import report_analysis as RA

    rows = []
    for calib, de, sw in (("de", (30, 29, 31), (10, 9, 11)), ("sw", (20, 19, 21), (10.5, 9, 12))):
        row = {"method": "wanda", "calib_lang": calib}
        for lang, (v, lo, hi) in (("de", de), ("sw", sw)):
            for band in ("early", "middle", "late"):
                name = f"snr_acc.band.{band}.{lang}"
                row.update({name: v, f"{name}.ci95_low": lo, f"{name}.ci95_high": hi})
        rows.append(row)
    items = RA.snr_sentences(pd.DataFrame(rows), "wanda", ["de", "sw"])
    assert len(items) == 3
    own = "is highest when calibrated on L in 1 of 2 cases (de 30.00 [29.00, 31.00] dB)"
    assert own in items[0]
    assert "lower in 0, indistinguishable in 1" in items[0]


def test_relative_lsar_change_and_the_mid_late_shift():
    import torch

    from analysis import lsar as LS
    from analysis import uncertainty as U

    gen = torch.Generator().manual_seed(0)
    langs = ("de", "sw")
    dense = [{lang: torch.randn(20, 8, generator=gen) for lang in langs} for _ in range(6)]
    bases = [LS.fit_lsar(LS.language_means(by)[0], languages=langs) for by in dense]
    scale = [0.01, 0.01, 0.1, 0.1, 0.1, 0.1]  # later layers move 10x more
    pooled = {lang: [d[lang] + s * torch.randn(20, 8, generator=gen)
                     for d, s in zip(dense, scale)] for lang in langs}
    m = U.lsar_intervals(dense, pooled, bases, seed=0)
    agn, spec, ref = LS.change_norms(dense[0]["de"], pooled["de"][0], bases[0])
    a1, s1, r1 = LS.change_norms(dense[1]["de"], pooled["de"][1], bases[1])
    expected = float((agn.sum() + a1.sum()) / (ref.sum() + r1.sum()))
    assert m["lsar.rel.agnostic.band.early.de"] == pytest.approx(expected, rel=1e-6)
    assert m["lsar.rel.agnostic.midlate_minus_early.ci95_low"] > 0
    assert m == U.lsar_intervals(dense, pooled, bases, seed=0)
    runs = pd.DataFrame([{"method": "wanda", "calib_lang": c, **m} for c in langs])
    from analysis import report_analysis as RA

    text = " ".join(RA.lsar_sentences(runs, "wanda", list(langs)))
    assert "agnostic loss concentrated in middle-to-late layers: yes in 2, no in 0" in text
    assert "as a share of the dense feature norm" in text


def test_lape_intervals_are_paired_and_seeded():
    import torch

    from analysis import lape as LP
    from analysis import lape_uncertainty as LU

    gen = torch.Generator().manual_seed(0)
    langs = ("de", "sw")
    counter = LP.ActivationCounter(langs, 2, 50, per_window=True)
    for k, lang in enumerate(langs):
        for layer in range(2):
            bias = torch.zeros(50)
            bias[k * 10:(k + 1) * 10] = 3.0  # neurons 0-9 fire for de, 10-19 for sw
            counter.update(lang, layer, torch.randn(6, 16, 50, generator=gen) - 1 + bias)
    assert counter.window_counts("de").shape == (6, 2, 50)
    share = torch.full((2, 50), 0.25)
    m = LU.lape_intervals(counter, counter, share, 16, 0.1, 0.5, seed=0, resamples=50)
    assert m == LU.lape_intervals(counter, counter, share, 16, 0.1, 0.5, seed=0, resamples=50)
    assert m["lape.overlap.de.ci95_low"] == m["lape.overlap.de.ci95_high"] == 1.0  # same model
    assert m["lape.removed.sw.ci95_low"] == pytest.approx(0.25)
