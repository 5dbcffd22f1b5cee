"""RIA (Zhang et al., "Plug-and-Play: An Efficient Post-training Pruning Method for Large
Language Models", ICLR 2024): Relative Importance and Activations.

Score (Sec. 3, the RIA metric)::

    S_ij = (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) * ||X_j||_2 ** a

The first term is the weight's share of its input column j (summed over output rows k), the
second its share of its output row i (summed over input columns k); ``||X_j||_2`` is the
norm of input feature j over all calibration tokens, the statistic Wanda uses. Weights are
compared within each output row, like Wanda, so every row gets exactly the target sparsity;
N:M takes the ``n`` lowest of every ``m`` consecutive weights of a row. No weight update.
The paper's channel permutation for N:M is not part of this method.

Sample YAML::

    method: ria
    sparsity: 0.5
    pattern: unstructured   # or 2:4
    ria_alpha: 0.5          # exponent a of ||X_j||_2 (paper default)

Lifecycle: statistic :class:`~pipeline.pruners.base.ColumnSquares` (sum of x_j^2, float32,
shared by linears reading the same input) -> :meth:`RIAPruner.prune`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from pipeline.errors import LangpruneError
from pipeline.pruners.base import (
    ColumnSquares,
    LayerPruner,
    PruneOutcome,
    SparsityTarget,
    Statistic,
    check_target,
)
from pipeline.pruners.masks import all_finite, check_weight, select_mask, zero_where

#: Exponent ``a`` of the activation term; the paper's default (0.5 throughout its tables).
DEFAULT_ALPHA = 0.5


def check_alpha(a: float) -> None:
    """Raise :class:`LangpruneError` unless ``a`` is a finite number >= 0.

    ``a = 0`` is allowed: it is the paper's ablation "relative importance alone".
    """
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a < 0:
        raise LangpruneError(f"ria_alpha must be a finite number >= 0, got {a!r}")


def ria_scores(weight: Tensor, col_norms: Tensor, a: float = DEFAULT_ALPHA) -> Tensor:
    """RIA's importance ``(|W_ij|/sum_k|W_kj| + |W_ij|/sum_k|W_ik|) * ||X_j||_2 ** a``, float32.

    A column (or row) whose weights are all zero has a zero sum; its relative-importance term
    is defined as 0 (instead of 0/0 = NaN), so such weights score 0 and are pruned first.
    """
    w = weight.detach().abs().float()  # a new tensor: abs() never aliases the weight
    col_sum = w.sum(dim=0, keepdim=True)  # [1, in]: over the output rows k
    row_sum = w.sum(dim=1, keepdim=True)  # [out, 1]: over the input columns k
    # A zero sum means every |W| it covers is 0: dividing those zeros by 1 gives the term 0.
    col_sum = torch.where(col_sum > 0, col_sum, torch.ones_like(col_sum))
    row_sum = torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
    scores = w / col_sum
    scores += w.div_(row_sum)  # w is ours: reuse its memory for the second term
    act = col_norms.detach().float().to(weight.device).pow(a)  # 0 ** 0 = 1: a = 0 is RI alone
    return scores.mul_(act[None, :])


def ria_prune(
    weight: Tensor, col_norms: Tensor, sparsity: float, n: int = 0, m: int = 0,
    a: float = DEFAULT_ALPHA,
) -> tuple[Tensor, Tensor]:
    """Prune with RIA's score (see :func:`ria_scores`), compared within each output row.

    Unstructured: every row loses exactly ``floor(sparsity * in_features)`` weights.
    N:M: the ``n`` lowest scores of every ``m`` consecutive weights of a row. Ties go to the
    lower column index.

    Args:
        weight: Weight matrix ``[out_features, in_features]`` (any float dtype; not modified).
        col_norms: ``||X_j||_2`` of each input feature over the calibration tokens,
            ``[in_features]`` (the :class:`~pipeline.pruners.base.ColumnSquares` statistic).
        sparsity: Fraction to prune, in [0, 1); must equal ``n / m`` for N:M.
        n: Pruned weights per group (0 = unstructured).
        m: Group size (0 = unstructured).
        a: Exponent of the activation term, >= 0 (0 = relative importance alone).

    Returns:
        ``(pruned_weight, mask)``: the weight with pruned entries set to 0 (same dtype), and
        the bool mask, True where pruned.

    Example:
        >>> w = torch.tensor([[4.0, 1.0]])   # one row: RI = 1 + |W| / 5 = [1.8, 1.2]
        >>> ria_prune(w, torch.tensor([1.0, 4.0]), 0.5)[1]   # scores 1.8, 2.4
        tensor([[ True, False]])
    """
    check_target(sparsity, n, m)
    check_weight(weight)
    check_alpha(a)
    if col_norms.shape != (weight.shape[1],):
        raise LangpruneError(
            f"col_norms has shape {tuple(col_norms.shape)}, expected ({weight.shape[1]},)"
        )
    if not all_finite(col_norms):
        raise LangpruneError("col_norms contain NaN or Inf")
    mask = select_mask(ria_scores(weight, col_norms, a), sparsity, n, m, per="row")
    return zero_where(weight.detach(), mask), mask


class RIAPruner(LayerPruner):
    """RIA: per-row selection by relative importance times ``||X||_2 ** a``."""

    name = "ria"
    statistic = ColumnSquares

    def __init__(self, alpha: float = DEFAULT_ALPHA) -> None:
        check_alpha(alpha)
        self.alpha = alpha

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> RIAPruner:
        return cls(alpha=float(options.get("ria_alpha", DEFAULT_ALPHA)))

    def prune(
        self, weight: Tensor, statistic: Statistic | None, target: SparsityTarget
    ) -> PruneOutcome:
        if not isinstance(statistic, ColumnSquares):
            raise TypeError("ria needs a ColumnSquares statistic")
        pruned, mask = ria_prune(
            weight, statistic.col_norms(), target.sparsity, target.n, target.m, self.alpha
        )
        return PruneOutcome(pruned, mask)
