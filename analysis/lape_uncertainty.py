"""Bootstrap intervals of the LAPE headlines: removed shares and dense-vs-pruned Jaccard.

Units are the analysis windows of each language, resampled separately and *paired*: one
resample reweights the same windows of the dense and the pruned model. Per resample, the
activation probabilities of both models are recomputed from the per-window counts, both
neuron selections are redone (:func:`analysis.lape.select_language_specific`, the same rule
as the headline) and ``lape.removed.<lang>`` (share of the dense selection's weights the
mask pruned) and ``lape.overlap.<lang>`` (Jaccard) are recomputed. Far fewer resamples than
the other analyses (:data:`RESAMPLES` = 50, so the 2.5/97.5% bounds are coarse), because each
one re-selects neurons twice: ~0.25 CPU s per resample on Gemma 3 270M with seven languages
(benchmarks/RESULTS.md section 7), which the sweep budget bounds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from analysis import lape as LP
from analysis.uncertainty import CONFIDENCE, stratified_weights

RESAMPLES = 50


def neuron_pruned_share(
    masks: Mapping[str, Tensor], n_layers: int, n_neurons: int, rows: Sequence[str],
    cols: Sequence[str],
) -> Tensor:
    """``[layers, neurons]``: share of each FFN neuron's weights the mask pruned."""
    modules = LP._ffn_modules(masks, (*rows, *cols))
    pruned = torch.zeros(n_layers, n_neurons, dtype=torch.float64)
    owned = torch.zeros(n_layers, n_neurons, dtype=torch.float64)
    for (layer, kind), name in modules.items():
        mask = masks[name]
        per = mask.sum(dim=1) if kind in rows else mask.sum(dim=0)
        pruned[layer] += per.to(torch.float64)
        owned[layer] += mask.shape[1] if kind in rows else mask.shape[0]
    return pruned / owned


def _probabilities(counts: Mapping[str, Tensor], w: Mapping[str, np.ndarray],
                   langs: Sequence[str], tokens: int) -> Tensor:
    out = []
    for lang in langs:
        weights = torch.from_numpy(w[lang]).to(torch.float64)
        out.append(torch.einsum("w,wln->ln", weights, counts[lang].to(torch.float64))
                   / (tokens * weights.sum()))
    return torch.stack(out)


def _jaccard(a: set[LP.Neuron], b: set[LP.Neuron]) -> float:
    union = len(a | b)
    return len(a & b) / union if union else math.nan


def _stats(dense: Mapping[str, set[LP.Neuron]], pruned: Mapping[str, set[LP.Neuron]],
           share: Tensor, lang: str) -> tuple[float, float]:
    sel = sorted(dense.get(lang, set()))
    removed = float(np.mean([float(share[i, j]) for i, j in sel])) if sel else math.nan
    return removed, _jaccard(dense.get(lang, set()), pruned.get(lang, set()))


def lape_intervals(
    dense: LP.ActivationCounter, pruned: LP.ActivationCounter, share: Tensor, tokens: int,
    top_rate: float, filter_quantile: float, seed: int, resamples: int = RESAMPLES,
) -> dict[str, float]:
    """``lape.removed|overlap.<lang>.ci95_low/high`` (the headlines are logged elsewhere).

    Args:
        dense, pruned: Per-window counters of the same windows (``per_window=True``).
        share: :func:`neuron_pruned_share` of the run's mask.
        tokens: Tokens per window.
        top_rate, filter_quantile: The selection rule of the headline.
        seed: Seeds the resampling.
        resamples: Bootstrap resamples.
    """
    langs = list(dense.languages)
    dc = {lang: dense.window_counts(lang) for lang in langs}
    pc = {lang: pruned.window_counts(lang) for lang in langs}
    sizes = [dc[lang].shape[0] for lang in langs]
    weights = stratified_weights(sizes, resamples, seed)
    edges = np.cumsum([0, *sizes])
    boot: dict[str, list[tuple[float, float]]] = {lang: [] for lang in langs}
    for row in weights:
        w = {lang: row[edges[k]:edges[k + 1]] for k, lang in enumerate(langs)}
        sel_d = LP.select_language_specific(_probabilities(dc, w, langs, tokens), langs,
                                            top_rate, filter_quantile)
        sel_p = LP.select_language_specific(_probabilities(pc, w, langs, tokens), langs,
                                            top_rate, filter_quantile)
        for lang in langs:
            boot[lang].append(_stats(sel_d, sel_p, share, lang))
    alpha = (1 - CONFIDENCE) / 2
    out: dict[str, float] = {}
    for lang in langs:
        arr = np.asarray(boot[lang], dtype=float)
        for k, name in enumerate(("removed", "overlap")):
            col = arr[:, k]
            low, high = ((math.nan, math.nan) if np.isnan(col).any()
                         else np.quantile(col, [alpha, 1 - alpha]))
            out[f"lape.{name}.{lang}.ci95_low"] = float(low)
            out[f"lape.{name}.{lang}.ci95_high"] = float(high)
    return out
