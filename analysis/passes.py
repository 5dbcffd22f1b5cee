"""Layer-wise passes of the analyses over the (dense or masked) model.

Every pass walks the decoder layers with :func:`pipeline.engine.layerwise_forward` (one
layer at a time on the device when offloading): the dense states at every layer boundary,
the local and accumulated SNR of a masked model against them (LAPE counted on the way), and
the pooled per-layer states of the LSAR sentences.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from analysis import lsar as LS
from analysis import snr as S
from analysis.neurons import FfnLayout, NeuronCounter
from analysis.text import AnalysisText
from pipeline.engine import LayerStep, layerwise_forward
from pipeline.models import decoder_layers


@dataclass
class Engine:
    """The loaded dense model and how passes over it are run.

    Attributes:
        model: The model (dense, or masked during one run's analysis).
        device: Compute device.
        batch_size: Windows / sentences per forward pass.
        offload: One decoder layer at a time on ``device``.
        layout: FFN layout of the decoder layers (for LAPE).
        n_neurons: FFN neurons per layer.
        progress: Show progress bars.
    """

    model: nn.Module
    device: torch.device
    batch_size: int
    offload: bool
    layout: FfnLayout
    n_neurons: int
    progress: bool = False

    @property
    def layers(self) -> nn.ModuleList:
        return decoder_layers(self.model)

    def walk(self, ids: Tensor) -> Iterator[LayerStep]:
        """One :class:`pipeline.engine.LayerStep` per decoder layer, over ``ids`` in batches."""
        return layerwise_forward(self.model, ids, device=self.device, batch_size=self.batch_size,
                                 offload=self.offload, progress=False)


def dense_window_states(engine: Engine, windows: Tensor) -> list[list[Tensor]]:
    """Dense hidden states at every layer boundary: index i = input of layer i (CPU).

    The last entry is the output of the last decoder layer.
    """
    states: list[list[Tensor]] = []
    outputs: list[Tensor] = []
    for step in engine.walk(windows):
        states.append([inp.hidden_states.detach().cpu() for inp in step.inputs])
        outputs = step.outputs
    states.append([out.detach().cpu() for out in outputs])
    return states


def snr_pass(
    engine: Engine, windows: Tensor, dense: Sequence[Sequence[Tensor]],
    counter: NeuronCounter | None, lang: str,
) -> tuple[list[S.SnrAccumulator], list[S.SnrAccumulator]]:
    """Local and accumulated SNR per layer of the (masked) model against dense states.

    The walk runs each layer on the model's own states (accumulated; LAPE is counted
    there); the same layer is also run on the dense input of that layer (local), with
    counting paused.
    """
    local, accumulated = [], []
    with _counting(counter, lang):
        for step in engine.walk(windows):
            i = step.index
            loc, acc = S.SnrAccumulator(), S.SnrAccumulator()
            with torch.inference_mode(), _counting(counter, None):
                for b, (inp, out) in enumerate(zip(step.inputs, step.outputs, strict=True)):
                    target = dense[i + 1][b].to(out.device)
                    acc.update(target, out)
                    loc.update(target, inp.call(step.layer, i, dense[i][b].to(out.device)))
            local.append(loc)
            accumulated.append(acc)
    return local, accumulated


def _counting(counter: NeuronCounter | None, lang: str | None) -> Any:
    """Count for ``lang`` (None: pause counting) during the block; no-op without a counter."""
    return contextlib.nullcontext() if counter is None else counter.counting(lang)


def pooled_states(engine: Engine, text: AnalysisText, lang: str, how: str) -> list[Tensor]:
    """Per layer, the pooled output states ``[K, d]`` (float32, CPU) of the LSAR sentences.

    Sentences are walked in batches of similar length (sorted by length, each batch cut to
    its longest sentence), so little compute goes into padding; rows come back in the
    original sentence order.
    """
    lengths = text.lengths[lang]
    order = torch.sort(lengths, stable=True).indices
    parts: list[list[Tensor]] = []
    for idx in order.split(engine.batch_size):
        width = int(lengths[idx].max())
        ids = text.sentences[lang][idx, :width]
        mask = text.attention_mask(lang)[idx, :width]
        per_layer = []
        for step in engine.walk(ids):
            with torch.inference_mode():
                out = torch.cat(step.outputs)
                per_layer.append(LS.pool(out, mask.to(out.device), how).cpu())
        parts.append(per_layer)
    inverse = torch.argsort(order)
    return [torch.cat([p[i] for p in parts])[inverse] for i in range(len(parts[0]))]
