"""The pruner interface: targets, outcomes, calibration statistics and the pruner protocol.

A pruner knows nothing of models or data. The layer-wise driver (:mod:`pipeline.capture`)
asks it for an empty :class:`Statistic`, feeds that statistic the inputs of a linear layer
(one statistic may serve several layers that read the same input, e.g. q/k/v), and then
calls :meth:`LayerPruner.prune` with the weight, the statistic and a :class:`SparsityTarget`.

Lifecycle of a method::

    pruner = PRUNERS.get("wanda").from_options({})
    stat = pruner.make_statistic(in_features, device)   # None: no calibration needed
    stat.add_batch(x)                                   # from a forward pre-hook, per batch
    outcome = pruner.prune(weight, stat, target)        # new weight + mask (+ loss)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from pipeline.config import parse_nm
from pipeline.errors import LangpruneError
from pipeline.pruners.masks import all_finite


@dataclass(frozen=True)
class SparsityTarget:
    """What to prune: a fraction of weights, optionally in an N:M pattern.

    Attributes:
        sparsity: Fraction of weights pruned, in [0, 1). For N:M it must equal N/M.
        n: Weights pruned in every group of ``m`` consecutive input columns (0 = unstructured).
        m: Group size of the N:M pattern (0 = unstructured).
    """

    sparsity: float
    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        check_target(self.sparsity, self.n, self.m)

    @classmethod
    def from_pattern(cls, sparsity: float, pattern: str) -> SparsityTarget:
        """Build from a config pattern string (``'unstructured'``, ``'2:4'``, ...)."""
        n, m = parse_nm(pattern)
        return cls(sparsity=sparsity, n=n, m=m)

    @property
    def structured(self) -> bool:
        """True for an N:M pattern."""
        return self.m > 0

    def describe(self) -> str:
        """Short label such as ``'50%'`` or ``'2:4'``."""
        return f"{self.n}:{self.m}" if self.m else f"{self.sparsity:.0%}"


def check_target(sparsity: float, n: int = 0, m: int = 0) -> None:
    """Raise :class:`LangpruneError` unless ``(sparsity, n, m)`` is a valid target.

    Valid: ``0 <= sparsity < 1``; either ``n == m == 0`` (unstructured) or ``0 < n < m``
    with ``sparsity == n / m``.
    """
    if not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity):
        raise LangpruneError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= sparsity < 1.0:
        raise LangpruneError(f"sparsity must be in [0, 1), got {sparsity}")
    if (n, m) == (0, 0):
        return
    if not (isinstance(n, int) and isinstance(m, int)) or not 0 < n < m:
        raise LangpruneError(f"N:M pattern {n}:{m}: needs integers 0 < N < M")
    if abs(sparsity - n / m) > 1e-9:
        raise LangpruneError(
            f"pattern {n}:{m} implies sparsity {n / m:g}, but sparsity={sparsity:g}"
        )


@dataclass
class PruneOutcome:
    """Result of pruning one weight matrix.

    Attributes:
        weight: The pruned (for SparseGPT also updated) weight, same shape and dtype as the input.
        mask: Bool tensor of the weight's shape, True where a weight was pruned.
        loss: SparseGPT's reconstruction loss (sum of w^2 / (2 [H^-1]_cc) terms); None otherwise.
        damp_retries: How often the damping had to be raised before Cholesky succeeded.
    """

    weight: Tensor
    mask: Tensor
    loss: float | None = None
    damp_retries: int = 0


class Statistic(ABC):
    """A float32 calibration statistic of a linear layer's input, accumulated batch by batch.

    Statistics live on the compute device. One instance may be shared by several linear
    layers that read the same input tensor.
    """

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.in_features = in_features
        self.device = device
        self.n_tokens = 0
        self.n_windows = 0
        # Quantities derived from the finished statistic (e.g. SparseGPT's Cholesky factor),
        # memoised so linears sharing the statistic compute them once; reset by add_batch.
        self.derived: dict[str, Any] = {}

    def add_batch(self, x: Tensor) -> None:
        """Accumulate the input ``x`` (``[..., in_features]``, any float dtype)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, expected {self.in_features}")
        flat = x.detach().reshape(-1, self.in_features)
        self.derived.clear()
        self.n_tokens += flat.shape[0]
        self.n_windows += x.shape[0] if x.dim() >= 3 else 1
        self._accumulate(flat)

    @abstractmethod
    def _accumulate(self, flat: Tensor) -> None: ...

    def release(self) -> None:
        """Drop the accumulated tensors and derived quantities once every linear that shares
        this statistic is pruned (the driver calls it), so their memory is free for the next
        group's work."""
        self.derived.clear()

    @abstractmethod
    def is_finite(self) -> bool:
        """False if the statistic holds NaN or Inf (a broken model or input)."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Memory held by the statistic, in bytes."""


class ColumnSquares(Statistic):
    """Per input feature j, the sum over all calibration tokens of x_j^2 (Wanda)."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        super().__init__(in_features, device)
        self.sum_sq = torch.zeros(in_features, dtype=torch.float32, device=device)

    def _accumulate(self, flat: Tensor) -> None:
        # Squares summed down the token dimension in float32 (a bf16 input is upcast first).
        # 4-6x faster on the CPU than vector_norm(dim=0).square(), which also rounds twice.
        self.sum_sq += flat.float().square().sum(dim=0)

    def col_norms(self) -> Tensor:
        """``||X_j||_2`` over all calibration tokens, float32 ``[in_features]``."""
        return self.sum_sq.sqrt()

    def release(self) -> None:
        super().release()
        self.sum_sq = torch.empty(0)

    def is_finite(self) -> bool:
        return all_finite(self.sum_sq)

    @property
    def nbytes(self) -> int:
        return self.sum_sq.numel() * 4


class Hessian(Statistic):
    """The sum over all calibration tokens of x x^T, float32 ``[in, in]`` (SparseGPT).

    X^T X is symmetric, so only the blocks on and above the diagonal are accumulated: row
    block ``i`` gets ``X_i^T X[:, i:]``, one GEMM per block of :data:`SYM_BLOCK` rows. For
    d = 2048 that is 9/16 of the FLOPs of the full ``addmm`` (torch exposes no ``syrk``);
    the lower triangle is mirrored in place once, when the Hessian is read.
    """

    #: Rows per block of the symmetric accumulation; a single full GEMM below twice this.
    SYM_BLOCK = 256

    def __init__(self, in_features: int, device: torch.device) -> None:
        super().__init__(in_features, device)
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self._mirrored = True
        self._taken = False

    def _accumulate(self, flat: Tensor) -> None:
        x32 = flat.float()
        d, b = self.in_features, self.SYM_BLOCK
        if d < 2 * b:
            self.xtx.addmm_(x32.T, x32)
            return
        self._mirrored = False
        for i in range(0, d, b):
            self.xtx[i : i + b, i:].addmm_(x32[:, i : i + b].T, x32[:, i:])

    def _mirror(self) -> None:
        """Copy the accumulated upper blocks onto the lower ones (in place, block by block)."""
        if self._mirrored:
            return
        d, b = self.in_features, self.SYM_BLOCK
        for i in range(0, d, b):
            self.xtx[i + b :, i : i + b] = self.xtx[i : i + b, i + b :].T
        self._mirrored = True

    def hessian(self) -> Tensor:
        """H = 2 X X^T / N with N the number of calibration windows (SparseGPT's scale)."""
        self._mirror()
        return self.xtx * (2.0 / max(self.n_windows, 1))

    def take_hessian(self) -> Tensor:
        """:meth:`hessian` without a copy: the statistic's own buffer is scaled in place and
        handed over; the statistic is finished (no more batches). Saves one d x d matrix at
        the factorisation's peak."""
        if self._taken:
            raise RuntimeError("take_hessian() was already called on this Hessian")
        self._mirror()
        h, self.xtx = self.xtx.mul_(2.0 / max(self.n_windows, 1)), torch.empty(0)
        self._taken = True
        return h

    def add_batch(self, x: Tensor) -> None:
        if self._taken:
            raise RuntimeError("this Hessian was taken by take_hessian(); it takes no batches")
        super().add_batch(x)

    def release(self) -> None:
        super().release()
        self.xtx = torch.empty(0)
        self._mirrored = True

    def is_finite(self) -> bool:
        if self._taken:
            return True  # checked before it was taken (the driver checks all statistics first)
        return all_finite(self.xtx)  # unmirrored, the lower blocks are zeros: no need to mirror

    @property
    def nbytes(self) -> int:
        return self.xtx.numel() * 4


class LayerPruner(ABC):
    """A pruning method: which statistic it needs and how it prunes one weight matrix."""

    #: Registry key; set by each subclass.
    name: ClassVar[str] = ""
    #: False when the method needs no calibration data: the driver then runs no forward passes.
    needs_calibration: ClassVar[bool] = True

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> LayerPruner:
        """Build from engine options (e.g. ``sparsegpt_blocksize``); unknown ones are ignored."""
        return cls()

    def make_statistic(self, in_features: int, device: torch.device) -> Statistic | None:
        """A fresh, empty statistic for a linear layer with ``in_features`` inputs.

        ``None`` means the method needs no calibration data (no hooks, no forward passes).
        """
        return None

    @abstractmethod
    def prune(
        self, weight: Tensor, statistic: Statistic | None, target: SparsityTarget
    ) -> PruneOutcome:
        """Prune one weight matrix ``[out_features, in_features]``; never modifies ``weight``."""
