"""Wanda (Sun et al., "A Simple and Effective Pruning Approach for LLMs", ICLR 2024).

Score S_ij = |W_ij| * ||X_j||_2 (eq. 1), with X_j the j-th input feature over all calibration
tokens, compared within each output row (the paper's per-output grouping): every row gets
exactly the target sparsity. No weight update. This is *not* the per-matrix
``|W| * ||X||^2`` variant some libraries call Wanda; golden tests pin the difference.

Sample YAML::

    method: wanda
    sparsity: 0.5
    pattern: unstructured   # or 2:4

Lifecycle: statistic :class:`~pipeline.pruners.base.ColumnSquares` (sum of x_j^2, float32,
shared by linears reading the same input) -> :meth:`WandaPruner.prune`.
"""

from __future__ import annotations

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


def wanda_scores(weight: Tensor, col_norms: Tensor) -> Tensor:
    """Wanda's importance ``|W_ij| * ||X_j||_2`` in float32."""
    scores = weight.detach().abs().float()  # a new tensor: abs() never aliases the weight
    return scores.mul_(col_norms.detach().float().to(weight.device)[None, :])


def wanda_prune(
    weight: Tensor, col_norms: Tensor, sparsity: float, n: int = 0, m: int = 0
) -> tuple[Tensor, Tensor]:
    """Prune with Wanda's score ``|W_ij| * ||X_j||_2``, compared within each output row.

    Unstructured: every row loses exactly ``floor(sparsity * in_features)`` weights.
    N:M: the ``n`` lowest scores of every ``m`` consecutive weights of a row. Ties go to the
    lower column index.

    Args:
        weight: Weight matrix ``[out_features, in_features]`` (any float dtype; not modified).
        col_norms: ``||X_j||_2`` of each input feature over the calibration tokens,
            ``[in_features]`` (e.g. ``x.reshape(-1, d).norm(dim=0)``).
        sparsity: Fraction to prune, in [0, 1); must equal ``n / m`` for N:M.
        n: Pruned weights per group (0 = unstructured).
        m: Group size (0 = unstructured).

    Returns:
        ``(pruned_weight, mask)``: the weight with pruned entries set to 0 (same dtype), and
        the bool mask, True where pruned.

    Example:
        >>> w = torch.tensor([[4.0, 1.0]])
        >>> wanda_prune(w, torch.tensor([1.0, 3.0]), 0.5)[1]   # scores 4, 3
        tensor([[False,  True]])
    """
    check_target(sparsity, n, m)
    check_weight(weight)
    if col_norms.shape != (weight.shape[1],):
        raise LangpruneError(
            f"col_norms has shape {tuple(col_norms.shape)}, expected ({weight.shape[1]},)"
        )
    if not all_finite(col_norms):
        raise LangpruneError("col_norms contain NaN or Inf")
    mask = select_mask(wanda_scores(weight, col_norms), sparsity, n, m, per="row")
    return zero_where(weight.detach(), mask), mask


class WandaPruner(LayerPruner):
    """Wanda: per-row selection by ``|W| * ||X||_2``."""

    name = "wanda"
    statistic = ColumnSquares

    def prune(
        self, weight: Tensor, statistic: Statistic | None, target: SparsityTarget
    ) -> PruneOutcome:
        if not isinstance(statistic, ColumnSquares):
            raise TypeError("wanda needs a ColumnSquares statistic")
        pruned, mask = wanda_prune(
            weight, statistic.col_norms(), target.sparsity, target.n, target.m
        )
        return PruneOutcome(pruned, mask)
