"""Headline-metric details of the analyses: dropped SNR layers, weight-updating methods, and
the bootstrap intervals of :mod:`analysis.uncertainty`."""

from __future__ import annotations

import math

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
