"""Pruning methods, registered by name in :data:`PRUNERS` (explicit imports, no scanning).

Use as a library (pure per-matrix functions; mask is bool, True = pruned)::

    from pipeline.pruners import magnitude_prune, ria_prune, wanda_prune, sparsegpt_prune
    w2, mask = wanda_prune(weight, col_norms, sparsity=0.5)          # col_norms = ||X_j||_2
    w2, mask = ria_prune(weight, col_norms, sparsity=0.5, a=0.5)     # relative importance
    w2, mask = magnitude_prune(weight, sparsity=0.5, n=2, m=4)       # 2:4
    res = sparsegpt_prune(weight, hessian, sparsity=0.5)             # res.weight, res.mask
    per_layer = owl_sparsities(layer_scores, sparsity=0.7)           # OWL: one per layer
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from pipeline.pruners.base import (
    ColumnSquares,
    Hessian,
    LayerPruner,
    PruneOutcome,
    SparsityTarget,
    Statistic,
    check_target,
)
from pipeline.pruners.magnitude import MagnitudePruner, magnitude_prune
from pipeline.pruners.owl import outlier_ratio, owl_sparsities
from pipeline.pruners.ria import RIAPruner, ria_prune
from pipeline.pruners.sparsegpt import (
    HessianFactor,
    SparseGPTPruner,
    SparseGPTResult,
    factor_hessian,
    sparsegpt_prune,
    sparsegpt_prune_factored,
)
from pipeline.pruners.wanda import WandaPruner, wanda_prune
from pipeline.registry import Registry

if TYPE_CHECKING:
    from pipeline.config import PruneCfg


def _build_registry() -> Registry[type[LayerPruner]]:
    registry: Registry[type[LayerPruner]] = Registry("pruning method")
    for cls in (MagnitudePruner, WandaPruner, SparseGPTPruner, RIAPruner):
        registry.add(cls.name, cls)
    return registry


#: Method name -> pruner class. Built once at import; never mutated afterwards.
PRUNERS: Registry[type[LayerPruner]] = _build_registry()
#: Statistic class name -> class (what a stored blend statistic says it is).
STATISTICS: Mapping[str, type[Statistic]] = MappingProxyType(
    {cls.__name__: cls for cls in (ColumnSquares, Hessian)}
)


def make_pruner(method: str, **options: object) -> LayerPruner:
    """Instantiate the registered method ``method`` with engine ``options``.

    Raises:
        LangpruneError: for an unknown name; the message lists the known ones.
    """
    return PRUNERS.get(method).from_options(options)


def pruner_from_config(prune: PruneCfg) -> LayerPruner:
    """The pruner a config asks for: ``prune.method`` with the config's method options.

    The one place where config fields become method options (:meth:`PruneCfg.method_options`).
    """
    return make_pruner(prune.method, **prune.method_options())


def target_from_config(prune: PruneCfg) -> SparsityTarget:
    """The uniform sparsity target of a config (``sparsity`` and ``pattern``)."""
    return SparsityTarget.from_pattern(prune.sparsity, prune.pattern)


__all__ = [
    "PRUNERS",
    "STATISTICS",
    "ColumnSquares",
    "Hessian",
    "HessianFactor",
    "LayerPruner",
    "MagnitudePruner",
    "PruneOutcome",
    "RIAPruner",
    "SparseGPTPruner",
    "SparseGPTResult",
    "SparsityTarget",
    "Statistic",
    "WandaPruner",
    "check_target",
    "factor_hessian",
    "magnitude_prune",
    "make_pruner",
    "pruner_from_config",
    "target_from_config",
    "outlier_ratio",
    "owl_sparsities",
    "ria_prune",
    "sparsegpt_prune",
    "sparsegpt_prune_factored",
    "wanda_prune",
]
