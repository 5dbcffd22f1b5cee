"""LSAR: language-specific and language-agnostic subspaces of hidden states (Xie et al. 2022).

Definitions (docs/science.md#lsar): stack the per-language mean hidden states of one layer as
the columns of M (d x L). With centroid c = M 1 / L, keep the rank r = L - 1 SVD of
M - c 1^T, M' = c 1^T + U_r S_r V_r^T; re-estimate the shared direction
c~ = pinv(M')^T 1, scaled to c~ / ||c~||^2; the language-specific subspace is spanned by the
top-r left singular vectors B of M' - c~ 1^T. Any state h splits into a specific part
B B^T h and an agnostic part h - B B^T h.

Xie, Zhao, Sun, Wang, "Discovering Low-rank Subspaces for Language-agnostic Multilingual
Representations", EMNLP 2022, Algorithm 1.

The fit runs in float64 on the CPU (M is only d x L). Applying a basis runs on the states'
device in float32 (float64 if the states are float64).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from pipeline.errors import LangpruneError
from pipeline.registry import suggest

POOLINGS = ("last", "mean")


@dataclass(frozen=True, eq=False)  # tensors have no boolean ==
class LsarBasis:
    """A fitted language-specific subspace of one layer.

    Attributes:
        basis: B, float64 [d, r] with orthonormal columns spanning the specific subspace.
        shared: The re-estimated shared direction c~ (scaled to c~ / ||c~||^2), float64 [d].
        centroid: The mean c of the language means, float64 [d].
        singular_values: Top-r singular values of M' - c~ 1^T, float64 [r].
        languages: Language of each column of M, in order (may be empty).
    """

    basis: Tensor
    shared: Tensor
    centroid: Tensor
    singular_values: Tensor
    languages: tuple[str, ...] = ()

    @property
    def rank(self) -> int:
        """Dimension r of the language-specific subspace."""
        return int(self.basis.shape[1])

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors for caching (e.g. ``safetensors.torch.save_file``); languages go in metadata."""
        return {
            "basis": self.basis,
            "shared": self.shared,
            "centroid": self.centroid,
            "singular_values": self.singular_values,
        }

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, Tensor], languages: Sequence[str] = ()
    ) -> LsarBasis:
        """Rebuild a basis saved with :meth:`state_dict`."""
        tensors = {
            k: state[k].to("cpu", torch.float64)
            for k in ("basis", "shared", "centroid", "singular_values")
        }
        return cls(**tensors, languages=tuple(languages))


class LsarChange(NamedTuple):
    """Mean L2 norm over states of the dense - pruned difference of each part."""

    agnostic: float
    specific: float


def fit_lsar(means: Tensor, rank: int | None = None, languages: Sequence[str] = ()) -> LsarBasis:
    """Fit the language-specific subspace from per-language mean states of one layer.

    Args:
        means: M, [d, L]: column k is the mean (pooled) hidden state of language k.
        rank: r; defaults to L - 1 (docs/science.md#lsar). Must satisfy 1 <= r <= min(L - 1, d).
        languages: Names of the L columns, stored with the basis.

    Returns:
        The fitted :class:`LsarBasis` (float64, CPU).

    Raises:
        LangpruneError: for fewer than two languages, a bad rank, or mismatched names.
    """
    if means.ndim != 2:
        raise LangpruneError(
            f"LSAR needs a [d, L] matrix of language means, got {tuple(means.shape)}"
        )
    m = means.detach().to("cpu", torch.float64)
    d, n_lang = m.shape
    r = n_lang - 1 if rank is None else rank
    if n_lang < 2 or not 1 <= r <= min(n_lang - 1, d):
        raise LangpruneError(
            f"LSAR rank must lie in [1, min(L-1, d)]; got r={r}, L={n_lang}, d={d}"
        )
    if languages and len(languages) != n_lang:
        raise LangpruneError(f"{len(languages)} language names for {n_lang} columns")
    centroid = m.mean(dim=1)
    u, s, vh = torch.linalg.svd(m - centroid[:, None], full_matrices=False)
    m_low = centroid[:, None] + (u[:, :r] * s[:r]) @ vh[:r]
    # Minimum-norm solution of M'^T c = 1: the direction shared (equally) by all languages.
    shared = torch.linalg.pinv(m_low).T @ torch.ones(n_lang, dtype=torch.float64)
    shared = shared / shared.dot(shared)
    u2, s2, _ = torch.linalg.svd(m_low - shared[:, None], full_matrices=False)
    return LsarBasis(
        basis=u2[:, :r].contiguous(),
        shared=shared,
        centroid=centroid,
        singular_values=s2[:r].clone(),
        languages=tuple(languages),
    )


def language_means(states: Mapping[str, Tensor]) -> tuple[Tensor, list[str]]:
    """Stack per-language mean states into M.

    Args:
        states: Language -> pooled states [n, d] (parallel sentences) of one layer.

    Returns:
        ``(M [d, L] float64, languages)`` with languages in sorted order.
    """
    langs = sorted(states)
    if not langs:
        raise LangpruneError("no languages given to LSAR")
    cols = [states[lang].detach().to("cpu", torch.float64).mean(dim=0) for lang in langs]
    return torch.stack(cols, dim=1), langs


def _compute_dtype(h: Tensor) -> torch.dtype:
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def split(h: Tensor, basis: LsarBasis) -> tuple[Tensor, Tensor]:
    """Split states into their language-specific and language-agnostic parts.

    Args:
        h: States [..., d] on any device.
        basis: A fitted :class:`LsarBasis` with the same d.

    Returns:
        ``(specific, agnostic)`` = ``(B B^T h, h - B B^T h)``, float32 (float64 for float64
        input), on ``h``'s device.
    """
    if h.shape[-1] != basis.basis.shape[0]:
        raise ValueError(f"states have d={h.shape[-1]}, basis has d={basis.basis.shape[0]}")
    dtype = _compute_dtype(h)
    b = basis.basis.to(h.device, dtype)
    x = h.detach().to(dtype)
    specific = (x @ b) @ b.T
    return specific, x - specific


def lsar_change(dense_h: Tensor, pruned_h: Tensor, basis: LsarBasis) -> LsarChange:
    """How much pruning moved the agnostic and the specific parts of the states.

    Both parts are linear in h, so the part of (dense - pruned) is the difference of parts.

    Args:
        dense_h: Dense-model states [n, d] (same sentences, same pooling as ``pruned_h``).
        pruned_h: Pruned-model states [n, d].
        basis: The subspace fitted on the dense model.

    Returns:
        ``LsarChange(agnostic, specific)``: the mean over the n states of the L2 norm of each
        part of the difference.
    """
    if dense_h.shape != pruned_h.shape:
        raise ValueError(
            f"dense and pruned states differ in shape: {tuple(dense_h.shape)} vs "
            f"{tuple(pruned_h.shape)}"
        )
    dtype = _compute_dtype(dense_h)
    diff = dense_h.detach().to(dtype) - pruned_h.detach().to(dense_h.device, dtype)
    specific, agnostic = split(diff, basis)
    return LsarChange(
        agnostic=float(torch.linalg.vector_norm(agnostic, dim=-1).mean()),
        specific=float(torch.linalg.vector_norm(specific, dim=-1).mean()),
    )


def change_norms(dense_h: Tensor, pruned_h: Tensor, basis: LsarBasis) -> tuple[Tensor, Tensor,
                                                                                Tensor]:
    """Per state: ``(||agnostic part of Δ||, ||specific part of Δ||, ||dense state||)``.

    The per-sentence terms of :func:`lsar_change` (whose parts are their means), plus the
    dense feature norm the relative changes of :mod:`analysis.uncertainty` divide by.
    """
    dtype = _compute_dtype(dense_h)
    diff = dense_h.to(dtype) - pruned_h.to(dtype)
    specific, agnostic = split(diff, basis)
    norm = torch.linalg.vector_norm
    return norm(agnostic, dim=-1), norm(specific, dim=-1), norm(dense_h.to(dtype), dim=-1)


def _check_pool_inputs(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    if hidden.ndim != 3:
        raise ValueError(f"hidden states must be [n, T, d], got {tuple(hidden.shape)}")
    n, t = hidden.shape[:2]
    if attention_mask is None:
        return torch.ones(n, t, dtype=torch.bool, device=hidden.device)
    if tuple(attention_mask.shape) != (n, t):
        raise ValueError(
            f"attention mask {tuple(attention_mask.shape)} does not match "
            f"hidden states {tuple(hidden.shape)}"
        )
    mask = attention_mask.to(hidden.device).bool()
    if not bool(mask.any(dim=1).all()):
        raise ValueError("a sequence has no attended token")
    return mask


def last_token_pool(hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """The state of each sequence's last attended token (left or right padding).

    Args:
        hidden: States [n, T, d].
        attention_mask: [n, T], 1/True for real tokens; None means no padding.

    Returns:
        [n, d] float32 states.
    """
    mask = _check_pool_inputs(hidden, attention_mask)
    positions = torch.arange(hidden.shape[1], device=hidden.device).expand_as(mask)
    last = torch.where(mask, positions, -1).amax(dim=1)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last].float()


def mean_pool(hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """The mean state over each sequence's attended tokens.

    Args:
        hidden: States [n, T, d].
        attention_mask: [n, T], 1/True for real tokens; None means no padding.

    Returns:
        [n, d] float32 states.
    """
    mask = _check_pool_inputs(hidden, attention_mask).float()[..., None]
    return (hidden.float() * mask).sum(dim=1) / mask.sum(dim=1)


def pool(hidden: Tensor, attention_mask: Tensor | None, how: str = "last") -> Tensor:
    """Pool states [n, T, d] to [n, d] with ``how`` in :data:`POOLINGS` (default last token)."""
    if how == "last":
        return last_token_pool(hidden, attention_mask)
    if how == "mean":
        return mean_pool(hidden, attention_mask)
    raise LangpruneError(
        f"unknown LSAR pooling {how!r}; known: {', '.join(POOLINGS)}{suggest(how, list(POOLINGS))}"
    )
