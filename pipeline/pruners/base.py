"""The pruner interface: targets, outcomes, calibration statistics and the pruner protocol.

A pruner knows nothing of models or data. The layer-wise driver (:mod:`pipeline.engine`)
asks it for an empty :class:`Statistic`, feeds that statistic the inputs of a linear layer
(one statistic may serve several layers that read the same input, e.g. q/k/v), and then
calls :meth:`LayerPruner.prune` with the weight, the statistic and a :class:`SparsityTarget`.

Lifecycle of a method::

    pruner = PRUNERS.get("wanda").from_options({})
    stat = pruner.make_statistic(in_features, device)   # None: no calibration needed
    stat.add_batch(x)                                   # from a forward pre-hook, per batch
    outcome = pruner.prune(weight, stat, target)        # new weight + mask (+ loss)

Blends without a forward pass (the fast blend search): a statistic built with
``keep_windows=True`` remembers one language's windows in :meth:`Statistic.blend_state`, and
:meth:`Statistic.combine` builds the statistic of a blend from such states and window counts.
How the parts combine is the statistic's business (exact per window for column sums, a
scaled total for X X^T), so the search names no method.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
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
            f"pattern {n}:{m} implies sparsity {n / m:g}, but sparsity={sparsity:g};"
            f" set sparsity={n / m:g}"
        )


@dataclass
class PruneOutcome:
    """Result of pruning one weight matrix.

    Attributes:
        weight: The pruned (for SparseGPT also updated) weight, same shape and dtype as the input.
            The driver may adopt this tensor as the layer's weight instead of copying it, so a
            pruner hands over a tensor it does not use afterwards.
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

    def __init__(self, in_features: int, device: torch.device, keep_windows: bool = False) -> None:
        self.in_features = in_features
        self.device = device
        self.keep_windows = keep_windows  # remember per-window parts (see blend_state)
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

    @abstractmethod
    def blend_state(self) -> Tensor:
        """What one language contributes to blends: a float32 tensor for :meth:`combine`."""

    @classmethod
    @abstractmethod
    def combine(cls, parts: Sequence[tuple[Tensor, int, int]], device: torch.device) -> Statistic:
        """The statistic of a blend from ``(blend_state, windows stored, windows taken)`` parts.

        Raises:
            LangpruneError: a part takes more windows than it stores, or no part is given.
        """


def check_parts(parts: Sequence[tuple[Tensor, int, int]]) -> None:
    """Every part takes between 1 and its stored windows; at least one part."""
    if not parts:
        raise LangpruneError("a blend without windows has no statistics")
    for _, stored, count in parts:
        if not 0 < count <= stored:
            raise LangpruneError(f"{count} windows asked of a statistic of {stored}")


class ColumnSquares(Statistic):
    """Per input feature j, the sum over all calibration tokens of x_j^2 (Wanda, RIA).

    A blend is exact: with ``keep_windows`` each window's sums are kept, and a blend adds the
    first ``c_L`` windows of each language.
    """

    def __init__(self, in_features: int, device: torch.device, keep_windows: bool = False) -> None:
        super().__init__(in_features, device, keep_windows)
        self.sum_sq = torch.zeros(in_features, dtype=torch.float32, device=device)
        self._windows: list[Tensor] = []

    def add_batch(self, x: Tensor) -> None:
        super().add_batch(x)
        if self.keep_windows:
            b = x.shape[0] if x.dim() >= 3 else 1
            per_window = x.detach().reshape(b, -1, self.in_features).float()
            self._windows.append(per_window.square().sum(dim=1))

    def _accumulate(self, flat: Tensor) -> None:
        # Squares summed down the token dimension in float32 (a bf16 input is upcast first).
        # 4-6x faster on the CPU than vector_norm(dim=0).square(), which also rounds twice.
        self.sum_sq += flat.float().square().sum(dim=0)

    def blend_state(self) -> Tensor:
        """``[n_windows, in_features]``: per window, the sums of x_j^2 over its tokens."""
        if not self.keep_windows:
            raise RuntimeError("blend_state() needs a statistic built with keep_windows=True")
        return torch.cat(self._windows) if self._windows else torch.zeros(0, self.in_features)

    @classmethod
    def combine(cls, parts: Sequence[tuple[Tensor, int, int]],
                device: torch.device) -> ColumnSquares:
        check_parts(parts)
        stat = cls(int(parts[0][0].shape[-1]), device)
        for state, _, count in parts:
            stat.sum_sq += state[:count].to(device).sum(dim=0)
            stat.n_windows += count
        return stat

    def col_norms(self) -> Tensor:
        """``||X_j||_2`` over all calibration tokens, float32 ``[in_features]``."""
        return self.sum_sq.sqrt()

    def release(self) -> None:
        super().release()
        self.sum_sq = torch.empty(0)
        self._windows = []

    def is_finite(self) -> bool:
        return all_finite(self.sum_sq)

    @property
    def nbytes(self) -> int:
        return self.sum_sq.numel() * 4


class Hessian(Statistic):
    """The sum over all calibration tokens of x x^T, float32 ``[in, in]`` (SparseGPT).

    A blend is an expectation, not exact: storing X X^T per window is infeasible, so a blend
    takes ``c_L / n_L`` of each language's total over its ``n_L`` windows.

    X^T X is symmetric, so only the blocks on and above the diagonal are accumulated: row
    block ``i`` gets ``X_i^T X[:, i:]``, one GEMM per block of :data:`SYM_BLOCK` rows. For
    d = 2048 that is 9/16 of the FLOPs of the full ``addmm`` (torch exposes no ``syrk``);
    the lower triangle is mirrored in place once, when the Hessian is read.
    """

    #: Rows per block of the symmetric accumulation; a single full GEMM below twice this.
    SYM_BLOCK = 256

    def __init__(self, in_features: int, device: torch.device, keep_windows: bool = False) -> None:
        # X X^T is a total in any case: a blend scales it (see combine), nothing per window.
        super().__init__(in_features, device, keep_windows)
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

    def blend_state(self) -> Tensor:
        """``[in, in]``: the full X X^T over the language's windows (not scaled)."""
        self._mirror()
        return self.xtx

    @classmethod
    def combine(cls, parts: Sequence[tuple[Tensor, int, int]], device: torch.device) -> Hessian:
        check_parts(parts)
        stat = cls(int(parts[0][0].shape[-1]), device)
        for state, stored, count in parts:
            stat.xtx.add_(state.to(device), alpha=count / stored)
            stat.n_windows += count
        return stat


class LayerPruner(ABC):
    """A pruning method: which statistic it needs and how it prunes one weight matrix."""

    #: Registry key; set by each subclass.
    name: ClassVar[str] = ""
    #: False when the method needs no calibration data: the driver then runs no forward passes.
    needs_calibration: ClassVar[bool] = True
    #: The calibration statistic the method reads (what :meth:`make_statistic` builds).
    statistic: ClassVar[type[Statistic] | None] = None
    #: True when the method also changes the weights it keeps (SparseGPT's reconstruction):
    #: the pruned model is then not dense weights x mask, and analyses must re-prune.
    updates_weights: ClassVar[bool] = False

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> LayerPruner:
        """Build from engine options (e.g. ``sparsegpt_blocksize``); unknown ones are ignored."""
        return cls()

    def make_statistic(self, in_features: int, device: torch.device,
                       keep_windows: bool = False) -> Statistic | None:
        """A fresh, empty statistic for a linear layer with ``in_features`` inputs.

        ``None`` means the method needs no calibration data (no hooks, no forward passes).
        """
        return None if self.statistic is None else self.statistic(in_features, device,
                                                                    keep_windows)

    def check_target(self, target: SparsityTarget) -> None:  # noqa: B027 (a default, no-op)
        """Raise :class:`LangpruneError` if the method cannot reach ``target`` (before work)."""

    def numerics(self, device: torch.device | str) -> dict[str, str]:
        """Numerical choices the method makes on ``device`` (logged as tags); none by default."""
        return {}

    @abstractmethod
    def prune(
        self, weight: Tensor, statistic: Statistic | None, target: SparsityTarget
    ) -> PruneOutcome:
        """Prune one weight matrix ``[out_features, in_features]``; never modifies ``weight``."""
