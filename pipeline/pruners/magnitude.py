"""Magnitude pruning: drop the smallest |W| of each weight matrix (whole-matrix comparison).

Sample YAML::

    method: magnitude
    sparsity: 0.5
    pattern: unstructured   # or 2:4

Lifecycle: no statistic, no calibration forward passes; :meth:`MagnitudePruner.prune` only.
"""

from __future__ import annotations

from torch import Tensor

from pipeline.pruners.base import LayerPruner, PruneOutcome, SparsityTarget, Statistic, check_target
from pipeline.pruners.masks import check_weight, select_mask, zero_where


def magnitude_prune(
    weight: Tensor, sparsity: float, n: int = 0, m: int = 0
) -> tuple[Tensor, Tensor]:
    """Prune the weights of smallest magnitude.

    Unstructured: the ``floor(sparsity * numel)`` smallest ``|W_ij|`` of the whole matrix.
    N:M: the ``n`` smallest of every ``m`` consecutive weights of a row. Ties go to the lower
    flat index, so the result is deterministic.

    Args:
        weight: Weight matrix ``[out_features, in_features]`` (any float dtype; not modified).
        sparsity: Fraction to prune, in [0, 1); must equal ``n / m`` for N:M.
        n: Pruned weights per group (0 = unstructured).
        m: Group size (0 = unstructured).

    Returns:
        ``(pruned_weight, mask)``: the weight with pruned entries set to 0 (same dtype), and
        the bool mask, True where pruned.

    Example:
        >>> w = torch.tensor([[1.0, -3.0], [0.5, 2.0]])
        >>> magnitude_prune(w, 0.5)[1]
        tensor([[ True, False],
                [ True, False]])
    """
    check_target(sparsity, n, m)
    check_weight(weight)
    mask = select_mask(weight.detach().abs().float(), sparsity, n, m, per="matrix")
    return zero_where(weight.detach(), mask), mask


class MagnitudePruner(LayerPruner):
    """Magnitude pruning (no calibration data)."""

    name = "magnitude"
    needs_calibration = False

    def prune(
        self, weight: Tensor, statistic: Statistic | None, target: SparsityTarget
    ) -> PruneOutcome:
        pruned, mask = magnitude_prune(weight, target.sparsity, target.n, target.m)
        return PruneOutcome(pruned, mask)
