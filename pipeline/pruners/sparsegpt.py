"""SparseGPT (Frantar and Alistarh, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot", ICML 2023), Algorithm 1 with lazy batch updates.

With H = 2 X X^T / N and U the upper Cholesky factor of H^-1, columns are processed in
blocks of ``blocksize``: at each block start the mask of the whole block is chosen (lowest
w^2 / U_cc^2, exact count per block); each column's error err = (w_c - q_c) / U_cc is spread
over the remaining columns of the block (W -= err U[c, :]); after the block its errors update
all later columns at once. Dead inputs (H_jj = 0) get H_jj = 1 and a zero weight column.

Sample YAML::

    method: sparsegpt
    sparsity: 0.5
    pattern: unstructured          # or 2:4
    sparsegpt_blocksize: 128
    sparsegpt_percdamp: 0.01

Lifecycle: statistic :class:`~pipeline.pruners.base.Hessian` (sum of x x^T, float32, shared
by linears reading the same input) -> :meth:`SparseGPTPruner.prune`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pipeline.errors import LangpruneError
from pipeline.pruners.base import (
    Hessian,
    LayerPruner,
    PruneOutcome,
    SparsityTarget,
    Statistic,
    check_target,
)
from pipeline.pruners.linalg import upper_factor_of_inverse
from pipeline.pruners.masks import (
    all_finite,
    check_weight,
    lowest_in_matrix,
    lowest_n_of_m,
    zero_where,
)

log = logging.getLogger(__name__)

DEFAULT_BLOCKSIZE = 128  # columns per lazy-update block (SparseGPT paper)
DEFAULT_PERCDAMP = 0.01  # damping as a fraction of mean(diag H) (SparseGPT paper)
DAMP_GROWTH = 10.0  # factor applied to the damping after a failed Cholesky
MAX_DAMP_RETRIES = 6  # up to 10^6 x the initial damping before giving up
# Columns per nested lazy update inside a block (see _prune_block): small enough that the
# rank-1 updates touch little memory, large enough that the sub-block matmuls are efficient.
SUBBLOCK = 16
# How U = chol(H^-1) is computed (config key ``sparsegpt_factor``): ``lapack`` is the paper's
# cholesky -> cholesky_inverse -> cholesky on every device; ``products`` the product-based
# factorisation (:mod:`pipeline.pruners.linalg`); ``auto`` products on the CPU, else lapack.
# All give the same U up to float32 rounding.
FACTORS = ("auto", "products", "lapack")


@dataclass
class SparseGPTResult:
    """Result of :func:`sparsegpt_prune`.

    Attributes:
        weight: Pruned and updated weight, same shape and dtype as the input.
        mask: Bool mask, True where pruned.
        loss: Reconstruction loss, sum over pruned/updated columns of (w - q)^2 / (2 U_cc^2).
        damp_retries: How often the damping was raised before the Cholesky factorisation worked.
    """

    weight: Tensor
    mask: Tensor
    loss: float
    damp_retries: int


@dataclass
class HessianFactor:
    """What SparseGPT needs from a Hessian, computed once and reusable for every linear
    layer that shares the statistic (q/k/v share one factorisation).

    Attributes:
        upper: Upper Cholesky factor U of (H + lambda I)^-1, float32.
        dead: Bool ``[in_features]``, True for inputs with H_jj = 0 (weights zeroed).
        damp_retries: How often the damping was raised.
    """

    upper: Tensor
    dead: Tensor
    damp_retries: int


def factor_hessian(
    hessian: Tensor, percdamp: float = DEFAULT_PERCDAMP, *, overwrite: bool = False,
    factor: str = "auto",
) -> HessianFactor:
    """Prepare ``hessian`` for :func:`sparsegpt_prune_factored` (dead inputs, damping, Cholesky).

    Args:
        overwrite: Work in ``hessian`` itself (float32) instead of a copy: dead diagonal
            entries become 1; one d x d matrix less at the peak.
        factor: How U is computed, one of :data:`FACTORS` (see :func:`factor_method`).

    Raises:
        LangpruneError: if ``hessian`` is not finite and square, or Cholesky fails on every retry.
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise LangpruneError(f"hessian must be square, got shape {tuple(hessian.shape)}")
    if not all_finite(hessian):
        raise LangpruneError("hessian contains NaN or Inf")
    in_place = overwrite and hessian.dtype == torch.float32
    H = hessian.detach() if in_place else hessian.detach().to(torch.float32, copy=True)
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0  # dead inputs: never non-zero, so their weights cannot matter
    upper, retries = inverse_hessian_factor(H, percdamp, factor)
    return HessianFactor(upper, dead, retries)


def inverse_hessian_factor(
    hessian: Tensor, percdamp: float, factor: str = "auto"
) -> tuple[Tensor, int]:
    """Upper Cholesky factor U of (H + lambda I)^-1, lambda = percdamp * mean(diag H).

    If a factorisation fails (H not positive definite in float32), lambda is multiplied by
    :data:`DAMP_GROWTH` and the factorisation retried, up to :data:`MAX_DAMP_RETRIES` times.

    Returns:
        ``(U, retries)``.

    Raises:
        LangpruneError: if every retry fails.
    """
    diag = torch.diagonal(hessian)  # a view: damping is added in place, then undone
    undamped = diag.clone()
    mean_diag = float(undamped.mean())
    damp = percdamp * (mean_diag if mean_diag > 0 else 1.0)
    try:
        for retry in range(MAX_DAMP_RETRIES + 1):
            # H + lambda I without a second d x d matrix (and without building I).
            torch.add(undamped, damp, out=diag)
            upper, info = _upper_factor_of_inverse(hessian, factor)
            if int(info) == 0 and all_finite(upper):
                return upper, retry
            log.warning("sparsegpt: Cholesky failed with damping %.3g; retrying with %.3g",
                        damp, damp * DAMP_GROWTH)
            damp *= DAMP_GROWTH
    finally:
        diag.copy_(undamped)
    raise LangpruneError(
        f"sparsegpt: Cholesky failed even with damping {damp / DAMP_GROWTH:.3g} "
        f"after {MAX_DAMP_RETRIES} retries (Hessian not positive definite)"
    )


def factor_method(device: torch.device | str, factor: str = "auto") -> str:
    """``products`` (:mod:`pipeline.pruners.linalg`) or ``lapack`` (the paper's sequence):
    how :func:`factor_hessian` computes U on ``device`` for the setting ``factor``."""
    if factor not in FACTORS:
        raise LangpruneError(f"unknown sparsegpt_factor {factor!r}; known: {', '.join(FACTORS)}")
    if factor != "auto":
        return factor
    return "products" if torch.device(device).type == "cpu" else "lapack"


def _upper_factor_of_inverse(h: Tensor, factor: str = "auto") -> tuple[Tensor, int]:
    """U with U^T U = h^-1 (upper triangular), and a LAPACK-style ``info`` (0 = success).

    On the CPU from matrix products (:mod:`pipeline.pruners.linalg`: ~3x faster there than
    LAPACK on one thread); elsewhere the reference sequence cholesky -> cholesky_inverse ->
    upper cholesky of the SparseGPT paper. Both give U up to float32 rounding.
    """
    if factor_method(h.device, factor) == "products":
        return upper_factor_of_inverse(h)
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info):
        return chol, int(info)
    # at most three d x d matrices at once (H, L, then H, H^-1 and U)
    inverse = torch.cholesky_inverse(chol)
    del chol
    upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    return upper, int(info)


def _check_inputs(weight: Tensor, hessian: Tensor, n: int, m: int, blocksize: int) -> None:
    cols = weight.shape[1]
    if hessian.shape != (cols, cols):
        raise LangpruneError(f"hessian has shape {tuple(hessian.shape)}, expected ({cols}, {cols})")
    if blocksize < 1:
        raise LangpruneError(f"blocksize must be >= 1, got {blocksize}")
    if m and blocksize % m:
        raise LangpruneError(f"blocksize {blocksize} must be a multiple of M={m} for N:M")
    if m and cols % m:
        raise LangpruneError(
            f"N:M pattern {n}:{m} needs a column count divisible by {m}, got {cols}"
        )


@torch.no_grad()
def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    n: int = 0,
    m: int = 0,
    blocksize: int = DEFAULT_BLOCKSIZE,
    percdamp: float = DEFAULT_PERCDAMP,
    factor: str = "auto",
) -> SparseGPTResult:
    """Prune one weight matrix with SparseGPT's optimal-brain-surgeon updates.

    Unstructured: each block of ``blocksize`` columns loses exactly
    ``floor(sparsity * rows * block_cols)`` weights, chosen by the lowest w^2 / U_cc^2 at the
    block start. N:M: each group of ``m`` columns is chosen when the sweep reaches it (on the
    weights updated so far): the ``n`` lowest w^2 / U_cc^2 of every row. Ties go to the lower
    index. Computation is float32 on the weight's device.

    Args:
        weight: Weight matrix ``[out_features, in_features]`` (any float dtype; not modified).
        hessian: ``[in_features, in_features]``, proportional to X X^T of the calibration inputs
            (the scale does not matter). Not modified.
        sparsity: Fraction to prune, in [0, 1); must equal ``n / m`` for N:M.
        n: Pruned weights per group (0 = unstructured).
        m: Group size (0 = unstructured); ``blocksize`` must be a multiple of it.
        blocksize: Columns per lazy-update block.
        percdamp: Damping lambda as a fraction of mean(diag H).
        factor: How U = chol(H^-1) is computed, one of :data:`FACTORS`.

    Returns:
        A :class:`SparseGPTResult` (weight, mask with True = pruned, loss, damp_retries).
    """
    check_target(sparsity, n, m)
    check_weight(weight)
    _check_inputs(weight, hessian, n, m, blocksize)
    prepared = factor_hessian(hessian.to(weight.device), percdamp, factor=factor)
    return sparsegpt_prune_factored(weight, prepared, sparsity, n, m, blocksize)


@torch.no_grad()
def sparsegpt_prune_factored(
    weight: Tensor,
    factor: HessianFactor,
    sparsity: float,
    n: int = 0,
    m: int = 0,
    blocksize: int = DEFAULT_BLOCKSIZE,
) -> SparseGPTResult:
    """:func:`sparsegpt_prune` with a precomputed :func:`factor_hessian` (shared statistics)."""
    check_target(sparsity, n, m)
    check_weight(weight)
    _check_inputs(weight, factor.upper, n, m, blocksize)
    W = weight.detach().to(torch.float32, copy=True)
    hinv = factor.upper.to(W.device)
    dead = factor.dead.to(W.device)
    if bool(dead.any()):
        W[:, dead] = 0.0
    mask = torch.empty(W.shape, dtype=torch.bool, device=W.device)
    loss = torch.zeros((), dtype=torch.float32, device=W.device)
    cols = W.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        errors, loss_block = _prune_block(W, hinv, mask, i1, i2, sparsity, n, m)
        loss += loss_block
        # Lazy batch update: the block's errors reach all later columns in one matmul.
        W[:, i2:].addmm_(errors, hinv[i1:i2, i2:], alpha=-1.0)
    return SparseGPTResult(W.to(weight.dtype), mask, float(loss), factor.damp_retries)


def _prune_block(
    W: Tensor, hinv: Tensor, mask: Tensor, i1: int, i2: int, sparsity: float, n: int, m: int
) -> tuple[Tensor, Tensor]:
    """Prune columns ``i1:i2`` of ``W`` in place (setting ``mask``); returns (errors, loss).

    Works on the transposed block so each column is one contiguous row, and folds the
    mask and 1 / U_cc into one ``scale``: per column, err = w * scale is one multiply. The
    rest-of-block update is itself lazy: within a sub-block of :data:`SUBBLOCK` columns
    each error is spread by one rank-1 ``addr_``, and at the sub-block's end all of its
    errors reach the rest of the block in one matmul. This is the same arithmetic as
    per-column updates of the whole block (the paper's lazy batch idea, nested), but most of
    the work becomes matmuls instead of memory-bound rank-1 updates.
    """
    block_t = W[:, i1:i2].T.contiguous()  # [cols, rows]
    hinv1 = hinv[i1:i2, i1:i2]
    d = torch.diagonal(hinv1)
    if m:
        mask_t = torch.zeros_like(block_t, dtype=torch.bool)
    else:
        mask_t = lowest_in_matrix(block_t.square() / d.square()[:, None], sparsity)
    scale = mask_t / d[:, None]
    errors_t = torch.empty_like(block_t)
    cols = i2 - i1
    sub = _subblock(m)
    for s1 in range(0, cols, sub):
        s2 = min(s1 + sub, cols)
        for i in range(s1, s2):
            if m and i % m == 0:  # N:M: choose each group on the weights updated so far
                group = block_t[i : i + m].square() / d[i : i + m].square()[:, None]
                mask_t[i : i + m] = lowest_n_of_m(group.T, n, m).T
                scale[i : i + m] = mask_t[i : i + m] / d[i : i + m, None]
            torch.mul(block_t[i], scale[i], out=errors_t[i])  # (w - q) / U_cc, q = pruned w
            # Spread the error over the rest of the sub-block; column i itself becomes q (up
            # to rounding for pruned entries, which are zeroed exactly below).
            block_t[i:s2].addr_(hinv1[i, i:s2], errors_t[i], alpha=-1.0)
        if s2 < cols:
            block_t[s2:].addmm_(hinv1[s1:s2, s2:].T, errors_t[s1:s2], alpha=-1.0)
    W[:, i1:i2] = zero_where(block_t, mask_t).T
    mask[:, i1:i2] = mask_t.T
    return errors_t.T, errors_t.square().sum() / 2


def _subblock(m: int) -> int:
    """Sub-block width: :data:`SUBBLOCK`, rounded up to a multiple of M so that every N:M
    group lies inside one sub-block (its columns are up to date when it is chosen)."""
    if not m:
        return SUBBLOCK
    return m * -(-SUBBLOCK // m)


class SparseGPTPruner(LayerPruner):
    """SparseGPT with configurable block size, damping and factorisation."""

    name = "sparsegpt"
    statistic = Hessian
    updates_weights = True

    def __init__(self, blocksize: int = DEFAULT_BLOCKSIZE, percdamp: float = DEFAULT_PERCDAMP,
                 factor: str = "auto"):
        if blocksize < 1:
            raise LangpruneError(f"sparsegpt_blocksize must be >= 1, got {blocksize}")
        if not (math.isfinite(percdamp) and percdamp > 0):
            raise LangpruneError(f"sparsegpt_percdamp must be > 0, got {percdamp}")
        factor_method("cpu", factor)  # validates the name
        self.blocksize = blocksize
        self.percdamp = percdamp
        self.factor = factor

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> SparseGPTPruner:
        return cls(
            blocksize=int(options.get("sparsegpt_blocksize", DEFAULT_BLOCKSIZE)),
            percdamp=float(options.get("sparsegpt_percdamp", DEFAULT_PERCDAMP)),
            factor=str(options.get("sparsegpt_factor", "auto")),
        )

    def check_target(self, target: SparsityTarget) -> None:
        if target.m and self.blocksize % target.m:
            raise LangpruneError(
                f"sparsegpt_blocksize={self.blocksize} must be a multiple of M={target.m} "
                f"for {target.describe()}"
            )

    def numerics(self, device: torch.device | str) -> dict[str, str]:
        return {"sparsegpt_factor": factor_method(device, self.factor)}

    def prune(
        self, weight: Tensor, statistic: Statistic | None, target: SparsityTarget
    ) -> PruneOutcome:
        if not isinstance(statistic, Hessian):
            raise TypeError("sparsegpt needs a Hessian statistic")
        key = f"sparsegpt_factor:{self.percdamp!r}:{self.factor}"
        if key not in statistic.derived:  # computed once per shared statistic
            # the statistic is complete once pruning starts: factor its own buffer, no copy
            statistic.derived[key] = factor_hessian(statistic.take_hessian(), self.percdamp,
                                                    overwrite=True, factor=self.factor)
        res = sparsegpt_prune_factored(
            weight, statistic.derived[key], target.sparsity, target.n, target.m, self.blocksize
        )
        return PruneOutcome(res.weight, res.mask, res.loss, res.damp_retries)
