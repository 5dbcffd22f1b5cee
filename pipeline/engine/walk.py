"""The analysis walk: decoder layers run one by one without pruning, inputs and outputs kept."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pipeline import models
from pipeline.engine.inputs import (
    LayerInput,
    _capture,
    _embedding_placement,
    _prepare,
    check_windows,
    run_layer,
)


@dataclass
class LayerStep:
    """One decoder layer during :func:`layerwise_forward`.

    Attributes:
        index: Layer index.
        name: Qualified module name, e.g. ``model.layers.3``.
        layer: The decoder layer (on the compute device for the duration of the step).
        inputs: Per batch, the layer's inputs (``hidden_states`` plus its keyword inputs).
        outputs: Per batch, the layer's output hidden states.
    """

    index: int
    name: str
    layer: nn.Module
    inputs: list[LayerInput]
    outputs: list[Tensor]

    def run(self, module: nn.Module) -> list[Tensor]:
        """Run another module in this layer's place on the same inputs (e.g. the pruned layer)."""
        return run_layer(module, self.inputs, self.index)


def layerwise_forward(
    model: nn.Module,
    windows: Tensor,
    *,
    device: torch.device,
    batch_size: int = 8,
    offload: bool = False,
    progress: bool = False,
) -> Iterator[LayerStep]:
    """Walk the decoder layers on ``windows`` without pruning, yielding inputs and outputs.

    After each step the outputs become the next layer's inputs, so layer ``i`` sees the
    model's own hidden states (no pruning). Runs under ``torch.inference_mode``; with
    ``offload`` only the current layer is on ``device``. Breaking out of the loop early
    restores the model's placement. Several walks may be interleaved (e.g. ``zip`` over a
    dense and a pruned model for accumulated SNR): no grad mode is held across steps.

    Example:
        >>> for step in layerwise_forward(dense, windows, device=dev):
        ...     local = step.run(pruned_layers[step.index])       # same inputs, pruned layer
        ...     snr = snr_db(step.outputs, local)
    """
    check_windows(windows, batch_size)
    prefix, layers = _prepare(model, device, offload)
    was_training = model.training
    model.eval()
    # Grad mode is global state: it is entered per computation, never held across a yield,
    # so two walks can be interleaved (dense and pruned side by side) without leaking it.
    try:
        with torch.inference_mode(), _embedding_placement(model, layers, device, offload):
            inputs = _capture(model, layers, windows, batch_size, device, progress)
        for i, layer in enumerate(tqdm(layers, desc="layers", disable=not progress)):
            with models.onloaded(layer, device, offload):
                outputs = run_layer(layer, inputs, i)
                yield LayerStep(i, f"{prefix}.{i}", layer, inputs, outputs)
            for inp, out in zip(inputs, outputs, strict=True):
                inp.hidden_states = out
    finally:
        model.train(was_training)
