"""OWL's dense pre-pass: each decoder layer's outlier ratio, hence its sparsity.

OWL (Yin et al., ICML 2024; docs/science.md#owl-layer-wise-sparsity) sets layer l's sparsity
from D_l, the share of the layer's Wanda scores ``|W_ij| * ||X_j||_2`` (all its linears
pooled) above ``M`` times their mean. The scores are those of the *dense* model on the
calibration windows, as in the paper's code: one walk down the unpruned stack, each layer's
inputs the dense outputs of the layer before. The pruning pass then runs with one target
per layer (:func:`pipeline.engine.prune_layerwise`, ``layer_sparsities``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pipeline import models
from pipeline.engine.groups import input_hooks
from pipeline.engine.inputs import capture_layer_inputs
from pipeline.pruners import ColumnSquares
from pipeline.pruners.owl import owl_from_ratios, wanda_outlier_ratio


def owl_ratios(model: nn.Module, windows: Tensor, *, m: float, device: torch.device,
               batch_size: int = 8, offload: bool = False, progress: bool = False) -> list[float]:
    """D_l of every decoder layer of the dense ``model`` on ``windows``."""
    inputs = capture_layer_inputs(model, windows, batch_size, device, offload=offload)
    _, layers = models.find_decoder_layers(model)
    ratios = []
    for i, layer in enumerate(tqdm(layers, desc="owl outliers", disable=not progress)):
        with models.onloaded(layer, device, offload), torch.inference_mode():
            linears = models.find_linears(layer)
            stats = {n: ColumnSquares(lin.in_features, device) for n, lin in linears.items()}
            with input_hooks(linears, _feeder(stats)):
                for inp in inputs:
                    inp.hidden_states = inp.call(layer, i)  # dense outputs feed the next
            ratios.append(wanda_outlier_ratio([lin.weight for lin in linears.values()],
                                              [stats[n].col_norms() for n in linears], m))
    return ratios


def _feeder(stats: dict[str, ColumnSquares]) -> Callable[[str, Tensor], None]:
    def feed(name: str, x: Tensor) -> None:
        stats[name].add_batch(x)

    return feed


def owl_layer_sparsities(model: nn.Module, windows: Tensor, sparsity: float, *, m: float,
                         lam: float, device: torch.device, batch_size: int = 8,
                         offload: bool = False, progress: bool = False) -> list[float]:
    """OWL's per-layer sparsities (mean ``sparsity``) for the dense ``model``."""
    ratios = owl_ratios(model, windows, m=m, device=device, batch_size=batch_size,
                        offload=offload, progress=progress)
    return owl_from_ratios(ratios, sparsity, lam)
