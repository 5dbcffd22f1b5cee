"""Per-run measurements: SNR, LAPE counts and LSAR states of the masked model, as tables.

:func:`measure` runs the passes on the model as it is (masks applied by the caller);
:func:`lsar_frame`, :func:`lape_frame` and :func:`headline_metrics` turn the raw results
into the tables and headline numbers a run records.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import Tensor

from analysis import lape as LP
from analysis import lape_uncertainty as LU
from analysis import lsar as LS
from analysis import snr as S
from analysis import uncertainty as U
from analysis.keys import RunKeys
from analysis.neurons import NeuronCounter
from analysis.passes import Engine, pooled_states, snr_pass
from analysis.reference import DenseReference
from analysis.text import AnalysisText
from pipeline.config import Config
from pipeline.masks import PackedMask


@dataclass(eq=False)
class Context:
    """Everything shared by the analyses of one sweep's runs.

    Attributes:
        cfg: The analyze config (budgets, LAPE and LSAR options).
        engine: The dense model and how passes run.
        snapshot: Dense decoder-layer weights, restored after each run.
        text: Evaluation text token ids.
        dense: The (cached) dense reference.
        dense_states: Language -> dense states at each layer boundary (for SNR).
        dense_selection: Language-specific neurons of the dense model.
        cache_folder: Where the dense reference is cached.
        timings: Seconds spent loading the model (``load_s``) and on the dense side
            (``dense_s``).
        tokenizer: The model's tokenizer (to re-calibrate weight-updating runs).
        dense_windows: Dense LAPE counts per window (for the LAPE intervals).
    """

    cfg: Config
    engine: Engine
    snapshot: Any
    text: AnalysisText
    dense: DenseReference
    dense_states: dict[str, list[list[Tensor]]]
    dense_selection: dict[str, set[LP.Neuron]]
    cache_folder: Path
    timings: dict[str, float] = field(default_factory=dict)
    tokenizer: Any = None
    dense_windows: LP.ActivationCounter | None = None


class _Unpacked(Mapping[str, Tensor]):
    """Packed masks unpacked on access, one module at a time."""

    def __init__(self, packed: Mapping[str, PackedMask]) -> None:
        self._packed = packed

    def __getitem__(self, name: str) -> Tensor:
        return self._packed[name].unpack()

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)


@dataclass(eq=False)
class Measurements:
    """Raw per-run results before they are turned into tables."""

    snr_local: dict[str, list[S.SnrAccumulator]]
    snr_acc: dict[str, list[S.SnrAccumulator]]
    lape: LP.ActivationCounter
    pooled: dict[str, list[Tensor]]


def measure(ctx: Context) -> Measurements:
    """SNR, LAPE counts and LSAR pooled states of the model as it is now (masked)."""
    eng, text = ctx.engine, ctx.text
    counter = LP.ActivationCounter(text.languages, len(eng.layers), eng.n_neurons,
                                   per_window=True)
    hooks = NeuronCounter(counter, eng.layout)
    local, acc = {}, {}
    with hooks.hooked(eng.layers):
        for lang in text.languages:
            local[lang], acc[lang] = snr_pass(eng, text.windows[lang], ctx.dense_states[lang],
                                              hooks, lang)
    pooled = {}
    if ctx.dense.bases:
        pooled = {lang: pooled_states(eng, text, lang, ctx.cfg.analysis.lsar_pooling)
                  for lang in text.languages}
    return Measurements(local, acc, counter, pooled)


def lsar_frame(ctx: Context, pooled: Mapping[str, Sequence[Tensor]]) -> pd.DataFrame:
    """Per evaluation language x layer, the mean change of the agnostic and specific parts."""
    rows = []
    for lang in ctx.text.languages:
        if lang not in pooled:
            continue
        for layer, basis in enumerate(ctx.dense.bases):
            change = LS.lsar_change(ctx.dense.lsar_states[layer][lang], pooled[lang][layer], basis)
            rows.append([lang, layer, change.agnostic, change.specific])
    return pd.DataFrame(rows, columns=["eval_lang", "layer", "agnostic", "specific"])


def lape_frame(
    ctx: Context, counter: LP.ActivationCounter, masks: Mapping[str, PackedMask],
) -> tuple[pd.DataFrame, float, Tensor]:
    """Dense vs pruned language-specific neurons, and how much of them the mask removed.

    Returns:
        ``(table, removed_all, pruned LAPE scores)``: one row per language with
        ``n_dense``, ``n_pruned``, ``n_both``, ``jaccard`` and ``removed_fraction`` (of the
        dense language-specific neurons' weights); ``removed_all`` is that fraction over
        every FFN neuron (the reference).
    """
    a, lay = ctx.cfg.analysis, ctx.engine.layout
    p = counter.probabilities()
    pruned_sel = LP.select_language_specific(p, list(ctx.text.languages), a.lape_top_rate,
                                             a.lape_filter_quantile)
    table = LP.selection_overlap(ctx.dense_selection, pruned_sel).rename(
        columns={"n_a": "n_dense", "n_b": "n_pruned"})
    unpacked = _Unpacked(masks)
    removed = LP.removed_fraction(ctx.dense_selection, unpacked, lay.rows, lay.cols)
    table["removed_fraction"] = [removed.get(lang, math.nan) for lang in table["lang"]]
    everyone = {(layer, j) for layer in range(p.shape[1]) for j in range(p.shape[2])}
    removed_all = LP.removed_fraction({"all": everyone}, unpacked, lay.rows, lay.cols)["all"]
    return table, removed_all, LP.lape_scores(p)


def _mean_db(values: Sequence[float]) -> tuple[float, int]:
    """Mean of the finite per-layer SNRs and how many layers were dropped as non-finite.

    A layer whose SNR is +inf (identical outputs), -inf or NaN has no place in a dB mean; it
    is left out, and the count is logged as ``snr_*.mean.n_dropped`` so the mean never hides
    it (NaN when every layer is non-finite).
    """
    finite = [v for v in values if math.isfinite(v)]
    return (float(np.mean(finite)) if finite else math.nan), len(values) - len(finite)


def headline_metrics(
    snr: pd.DataFrame, lsar: pd.DataFrame, lape: pd.DataFrame, removed_all: float
) -> dict[str, float]:
    """Headline numbers of one run (see the README's analysis metrics)."""
    m: dict[str, float] = {}
    pooled = S.mean_snr_by_layer(snr)
    for kind, name in (("local", "snr_local"), ("accumulated", "snr_acc")):
        rows = pooled[pooled["kind"] == kind].sort_values("layer")
        m[f"{name}.mean"], dropped = _mean_db(rows["snr_db"].tolist())
        m[f"{name}.mean.n_dropped"] = float(dropped)
        m[f"{name}.final"] = float(rows["snr_db"].iloc[-1])
        for lang, group in snr[snr["kind"] == kind].groupby("eval_lang", sort=True):
            m[f"{name}.final.{lang}"] = float(group.sort_values("layer")["snr_db"].iloc[-1])
    for part in ("agnostic", "specific"):
        for lang, group in lsar.groupby("eval_lang", sort=True):
            m[f"lsar.{part}.{lang}"] = float(group[part].mean())
        if len(lsar):
            m[f"lsar.{part}.mean"] = float(lsar[part].mean())
    for row in lape.itertuples():
        m[f"lape.overlap.{row.lang}"] = float(row.jaccard)
        m[f"lape.removed.{row.lang}"] = float(row.removed_fraction)
    m["lape.removed.all"] = removed_all
    return m



def interval_metrics(
    ctx: Context, raw: Measurements, masks: Mapping[str, PackedMask] | None = None
) -> dict[str, float]:
    """Band SNR and relative LSAR changes with bootstrap intervals (:mod:`analysis.uncertainty`),
    and, given the run's masks and dense per-window counts, the LAPE intervals
    (:mod:`analysis.lape_uncertainty`); seeded with the run seed."""
    seed = ctx.cfg.run.seed
    out = U.snr_intervals(raw.snr_local, raw.snr_acc, seed)
    if raw.pooled:
        out.update(U.lsar_intervals(ctx.dense.lsar_states, raw.pooled, ctx.dense.bases, seed))
    if masks is not None and ctx.dense_windows is not None:
        a, lay, p = ctx.cfg.analysis, ctx.engine.layout, raw.lape.over_zero
        share = LU.neuron_pruned_share(_Unpacked(masks), p.shape[1], p.shape[2], lay.rows,
                                       lay.cols)
        tokens = int(next(iter(ctx.text.windows.values())).shape[1])
        out.update(LU.lape_intervals(ctx.dense_windows, raw.lape, share, tokens,
                                     a.lape_top_rate, a.lape_filter_quantile, seed))
    return out


def analysis_summary(
    ctx: Context, member: RunKeys, weights: str, metrics: Mapping[str, float]
) -> dict[str, Any]:
    """What was computed how: budgets, text sizes, cache key, weights mode, headline metrics."""
    a, text = ctx.cfg.analysis, ctx.text
    return {
        "run_id": member.run_id,
        "method": member.method,
        "calib_lang": member.calib_lang,
        "calib_set": member.calib_set,
        "weights": weights,
        "analysis_tokens": a.analysis_tokens,
        "analysis_seq_len": a.analysis_seq_len,
        "lsar_pooling": a.lsar_pooling,
        "lape_top_rate": a.lape_top_rate,
        "lape_filter_quantile": a.lape_filter_quantile,
        "languages": list(text.languages),
        "windows_per_language": {k: list(v.shape) for k, v in text.windows.items()},
        "lsar_sentences": int(next(iter(text.sentences.values())).shape[0]),
        "lsar_source": text.lsar_source,
        "dense_cache": ctx.dense.key,
        "metrics": {k: metrics[k] for k in sorted(metrics)},
    }
