"""OWL layer-wise sparsity (Yin et al., "Outlier Weighed Layerwise Sparsity (OWL): A Missing
Secret Sauce for Pruning LLMs to High Sparsity", ICML 2024).

OWL chooses one sparsity per decoder layer; a per-matrix method (Wanda, RIA, ...) then
prunes each linear of layer l at that layer's sparsity. Layers with more outliers keep more
weights. For layer l with Wanda scores A = |W_ij| * ||X_j||_2 pooled over all its linears:

1. Layer outlier distribution (Sec. 3, LOD): D_l = #{A > M * mean(A)} / #A.
2. The D_l are min-max scaled to [0, 2 * lambda].
3. S_l = sparsity - (scaled_l - mean(scaled)), so mean(S_l) = sparsity exactly: the model's
   overall sparsity is unchanged when all layers have the same number of weights (decoder
   layers of one model do).

The paper's defaults are M = 5 and lambda = 0.08. This module is the pure computation only;
the scores come from a dense pre-pass of the layer-wise driver.

Sample YAML (the keys a driver would read; not yet in the config)::

    method: wanda
    sparsity: 0.7
    owl_m: 5.0        # outlier threshold M, a multiple of the layer's mean score
    owl_lambda: 0.08  # per-layer sparsities lie within about +-2 lambda of the target

Lifecycle: dense pre-pass (one ColumnSquares per linear, Wanda scores pooled per layer) ->
:func:`owl_sparsities` -> one SparsityTarget per layer for the usual layer-wise pruning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from pipeline.errors import LangpruneError
from pipeline.pruners.base import check_target
from pipeline.pruners.masks import all_finite

#: Outlier threshold M (multiples of the layer's mean score); the paper's default.
DEFAULT_M = 5.0
#: Half-width lambda of the range of the scaled outlier ratios; the paper's default.
DEFAULT_LAMBDA = 0.08


def outlier_ratio(scores: Tensor, m: float = DEFAULT_M) -> float:
    """Share of ``scores`` strictly greater than ``m`` times their mean (OWL's D_l).

    Args:
        scores: Any-shaped, non-empty, finite tensor (a layer's pooled Wanda scores).
        m: Threshold multiple, > 0.

    Returns:
        The fraction in [0, 1]. The mean is taken in float64; the comparison is made in the
        scores' dtype.
    """
    _check_m(m)
    if scores.numel() == 0:
        raise LangpruneError("outlier_ratio: scores are empty")
    if not all_finite(scores):
        raise LangpruneError("outlier_ratio: scores contain NaN or Inf")
    mean = float(scores.sum(dtype=torch.float64)) / scores.numel()
    return int(torch.count_nonzero(scores > m * mean)) / scores.numel()


def owl_sparsities(
    layer_scores: Sequence[Tensor], sparsity: float, m: float = DEFAULT_M,
    lam: float = DEFAULT_LAMBDA,
) -> list[float]:
    """One sparsity per layer from the layers' outlier ratios (OWL, Sec. 3).

    ``S_l = sparsity - (scaled_l - mean(scaled))`` with ``scaled`` the outlier ratios
    min-max scaled to ``[0, 2 * lam]``: more outliers, lower sparsity; the mean of the
    ``S_l`` equals ``sparsity`` (up to float rounding). Equal ratios in every layer (also a
    single layer, or ``lam = 0``) give ``sparsity`` everywhere.

    Args:
        layer_scores: One tensor per decoder layer: the Wanda scores ``|W_ij| * ||X_j||_2``
            of all the layer's linears, pooled (e.g. flattened and concatenated).
        sparsity: The model's target sparsity, in [0, 1).
        m: Outlier threshold M, > 0 (see :func:`outlier_ratio`).
        lam: lambda, in ``[0, min(sparsity, 1 - sparsity)]``.

    Returns:
        The per-layer sparsities as Python floats, each in [0, 1).

    Raises:
        LangpruneError: on bad arguments, or if a layer's sparsity falls outside [0, 1)
            (possible near the ends of the range: the spread is up to +-2 lambda).

    Example:
        >>> layers = [torch.tensor([0.0] * 9 + [1.0]), torch.ones(10)]   # D = 0.1, 0
        >>> owl_sparsities(layers, 0.5, m=5.0, lam=0.1)
        [0.4, 0.6]
    """
    check_target(sparsity)
    _check_m(m)
    # + 1e-12: 1 - 0.9 is 0.09999999999999998, yet lambda = 0.1 at sparsity 0.9 is in range
    if not isinstance(lam, (int, float)) or not 0.0 <= lam <= min(sparsity, 1.0 - sparsity) + 1e-12:
        raise LangpruneError(
            f"OWL lambda must be in [0, min(sparsity, 1 - sparsity)] = "
            f"[0, {min(sparsity, 1.0 - sparsity):g}] at sparsity {sparsity:g}, got {lam!r}"
        )
    if len(layer_scores) == 0:
        raise LangpruneError("OWL needs the scores of at least one layer, got none")
    return owl_from_ratios([outlier_ratio(s, m) for s in layer_scores], sparsity, lam)


def check_owl(sparsity: float, m: float, lam: float) -> None:
    """Raise :class:`LangpruneError` (one line, with the allowed range) on bad OWL settings."""
    check_target(sparsity)
    _check_m(m)
    # + 1e-12: 1 - 0.9 is 0.09999999999999998, yet lambda = 0.1 at sparsity 0.9 is in range
    if (isinstance(lam, bool) or not isinstance(lam, (int, float))
            or not 0.0 <= lam <= min(sparsity, 1.0 - sparsity) + 1e-12):
        raise LangpruneError(
            f"owl_lambda must be in [0, min(sparsity, 1 - sparsity)] = "
            f"[0, {min(sparsity, 1.0 - sparsity):g}] at sparsity {sparsity:g}, got {lam!r}"
        )


def layer_outlier_ratio(scores: Callable[[], Iterable[Tensor]], m: float = DEFAULT_M) -> float:
    """:func:`outlier_ratio` of several tensors pooled, without holding them all at once.

    Args:
        scores: Called twice, each time yielding the layer's score tensors one by one (so a
            large layer never has all its scores in memory): the pooled mean, then the count
            above ``m`` times it.
        m: Threshold multiple, > 0.
    """
    _check_m(m)
    total, numel = 0.0, 0
    for s in scores():
        total += float(s.sum(dtype=torch.float64))
        numel += s.numel()
    if numel == 0:
        raise LangpruneError("outlier_ratio: scores are empty")
    if not math.isfinite(total):
        raise LangpruneError("outlier_ratio: scores contain NaN or Inf")
    threshold = m * total / numel
    return sum(int(torch.count_nonzero(s > threshold)) for s in scores()) / numel


def wanda_outlier_ratio(weights: Sequence[Tensor], col_norms: Sequence[Tensor],
                        m: float = DEFAULT_M) -> float:
    """D_l of one layer: its linears' Wanda scores ``|W_ij| * ||X_j||_2`` pooled, each
    matrix's scores computed when needed (never all of a layer's at once)."""
    from pipeline.pruners.wanda import wanda_scores

    def scores() -> Iterable[Tensor]:
        return (wanda_scores(w, c) for w, c in zip(weights, col_norms, strict=True))

    return layer_outlier_ratio(scores, m)


def owl_from_ratios(ratios: Sequence[float], sparsity: float,
                    lam: float = DEFAULT_LAMBDA) -> list[float]:
    """:func:`owl_sparsities` from the layers' outlier ratios D_l (already computed)."""
    if len(ratios) == 0:
        raise LangpruneError("OWL needs the outlier ratios of at least one layer, got none")
    lo, hi = min(ratios), max(ratios)
    if hi == lo:
        return [float(sparsity)] * len(ratios)  # nothing to tell the layers apart
    scaled = [(r - lo) / (hi - lo) * 2.0 * lam for r in ratios]
    mean = math.fsum(scaled) / len(scaled)
    result = [sparsity - (s - mean) for s in scaled]
    for idx, s in enumerate(result):
        if not 0.0 <= s < 1.0:
            raise LangpruneError(
                f"OWL sparsity of layer {idx} is {s:g}, outside [0, 1); lower lambda"
                f" (now {lam:g}) or move the target sparsity (now {sparsity:g}) from the ends"
            )
    return result


def _check_m(m: float) -> None:
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m <= 0:
        raise LangpruneError(
            f"owl_m: OWL's outlier threshold M must be a finite number > 0, got {m!r}"
        )
