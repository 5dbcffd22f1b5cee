"""The per-module sparsity report: what each pruned matrix lost, per layer and overall.

Rows are plain dataclasses; :func:`sparsity_tables` turns them into pandas tables that
:mod:`tracking` logs. "Sparsity" is the fraction of weights the method pruned (the mask);
``zeros_before`` counts weights that were already exactly zero (the default model's
dequantised 4-bit weights have ~2.3% of them), so the total zero fraction after pruning is
reported separately.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from pipeline.pruners.base import PruneOutcome
from pipeline.pruners.masks import count_true


@dataclass(frozen=True)
class ModuleSparsity:
    """One pruned weight matrix.

    Attributes:
        layer: Decoder layer index.
        module: Full module name, e.g. ``model.layers.3.self_attn.q_proj``.
        numel: Number of weights.
        pruned: Weights in the mask (True = pruned).
        zeros_before: Weights exactly zero before pruning.
        zeros_after: Weights exactly zero after pruning.
        loss: SparseGPT reconstruction loss (None for other methods).
        damp_retries: SparseGPT damping retries (0 for other methods).
    """

    layer: int
    module: str
    numel: int
    pruned: int
    zeros_before: int
    zeros_after: int
    loss: float | None = None
    damp_retries: int = 0

    @property
    def sparsity(self) -> float:
        """Fraction of weights pruned by the method."""
        return self.pruned / self.numel if self.numel else 0.0

    def as_row(self) -> dict[str, Any]:
        """A flat dict with the derived fractions, for tables."""
        row = asdict(self)
        row["sparsity"] = self.sparsity
        row["zero_fraction"] = self.zeros_after / self.numel if self.numel else 0.0
        row["preexisting_zero_fraction"] = self.zeros_before / self.numel if self.numel else 0.0
        row["loss"] = math.nan if self.loss is None else self.loss
        return row


def record_module(
    layer: int, module: str, weight_before: Tensor, outcome: PruneOutcome
) -> ModuleSparsity:
    """Count what pruning did to one matrix (``weight_before`` is the dense weight)."""
    with torch.no_grad():
        return ModuleSparsity(
            layer=layer,
            module=module,
            numel=weight_before.numel(),
            pruned=count_true(outcome.mask),
            zeros_before=weight_before.numel() - count_true(weight_before),
            zeros_after=outcome.weight.numel() - count_true(outcome.weight),
            loss=outcome.loss,
            damp_retries=outcome.damp_retries,
        )


def _aggregate(records: Sequence[ModuleSparsity]) -> dict[str, Any]:
    numel = sum(r.numel for r in records)
    losses = [r.loss for r in records if r.loss is not None]
    return {
        "modules": len(records),
        "numel": numel,
        "pruned": sum(r.pruned for r in records),
        "sparsity": sum(r.pruned for r in records) / numel if numel else 0.0,
        "zero_fraction": sum(r.zeros_after for r in records) / numel if numel else 0.0,
        "preexisting_zero_fraction": sum(r.zeros_before for r in records) / numel if numel else 0.0,
        "loss": sum(losses) if losses else math.nan,
        "damp_retries": sum(r.damp_retries for r in records),
    }


def module_rows(records: Iterable[ModuleSparsity]) -> list[dict[str, Any]]:
    """One dict per module, in pruning order."""
    return [r.as_row() for r in records]


def layer_rows(records: Iterable[ModuleSparsity]) -> list[dict[str, Any]]:
    """One dict per decoder layer (weighted by numel), sorted by layer index."""
    by_layer: dict[int, list[ModuleSparsity]] = {}
    for r in records:
        by_layer.setdefault(r.layer, []).append(r)
    return [{"layer": k, **_aggregate(v)} for k, v in sorted(by_layer.items())]


def overall(records: Sequence[ModuleSparsity]) -> dict[str, Any]:
    """Totals over all pruned matrices (sparsity weighted by numel, summed loss)."""
    return _aggregate(list(records))


MODULE_COLUMNS = (
    "layer", "module", "numel", "pruned", "zeros_before", "zeros_after", "loss",
    "damp_retries", "sparsity", "zero_fraction", "preexisting_zero_fraction",
)
LAYER_COLUMNS = (
    "layer", "modules", "numel", "pruned", "sparsity", "zero_fraction",
    "preexisting_zero_fraction", "loss", "damp_retries",
)


def sparsity_tables(result: Any) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """``(modules, layers, overall)`` of a PruneResult (or any object with ``.records``).

    The two tables always have the columns :data:`MODULE_COLUMNS` / :data:`LAYER_COLUMNS`,
    even when empty; ``loss`` is NaN for methods without one.
    """
    records = list(getattr(result, "records", result))
    layers = pd.DataFrame(layer_rows(records), columns=list(LAYER_COLUMNS))
    targets = list(getattr(result, "layer_targets", []) or [])
    if targets and len(layers) == len(targets):  # the sparsity each layer was asked for
        layers["target"] = [targets[int(i)] for i in layers["layer"]]
    return (
        pd.DataFrame(module_rows(records), columns=list(MODULE_COLUMNS)),
        layers,
        overall(records),
    )
