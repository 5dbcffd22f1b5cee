"""Hooks that count FFN-neuron activations (LAPE) during the layer-wise passes.

Which module of a decoder layer holds the neurons is the one family quirk here, kept in the
:data:`FFN_LAYOUTS` adapter table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from pipeline.errors import LangpruneError

if TYPE_CHECKING:
    from analysis import lape as LP


@dataclass(frozen=True)
class FfnLayout:
    """Where a decoder layer's FFN neurons are.

    Attributes:
        probe: Name (last component) of the module whose output (gated MLPs: ``gate_proj``)
            or input (plain MLPs: the down projection) decides whether a neuron fires.
        gated: True for gated MLPs (read the probe's output), False for plain ones (input).
        rows: Modules whose row j belongs to neuron j.
        cols: Modules whose column j belongs to neuron j.
    """

    probe: str
    gated: bool
    rows: tuple[str, ...]
    cols: tuple[str, ...]


# The one model-family adapter of the analyses: the MLP layouts LAPE understands, by the last
# name component of their linear modules. Add a row for a new family; nothing else in
# analysis/ knows module names.
FFN_LAYOUTS: tuple[FfnLayout, ...] = (
    # gated MLPs (Llama, Gemma, Qwen2, Mistral, Cohere): act_fn(gate_proj x) > 0 iff the
    # gate_proj output > 0; neuron j owns row j of gate/up and column j of down_proj.
    FfnLayout(probe="gate_proj", gated=True, rows=("gate_proj", "up_proj"), cols=("down_proj",)),
    # plain MLPs (GPT-NeoX / Pythia): the activation is the input of the down projection.
    FfnLayout(probe="dense_4h_to_h", gated=False, rows=("dense_h_to_4h",),
              cols=("dense_4h_to_h",)),
)


def ffn_layout(layer: nn.Module) -> tuple[FfnLayout, int]:
    """The FFN layout of a decoder layer (the first of :data:`FFN_LAYOUTS` it has every module
    of) and its number of neurons.

    Raises:
        LangpruneError: for an MLP that matches no entry of :data:`FFN_LAYOUTS`.
    """
    from pipeline.models import find_linears

    kinds = {name.rsplit(".", 1)[-1]: mod for name, mod in find_linears(layer).items()}
    for layout in FFN_LAYOUTS:
        if layout.probe in kinds and all(k in kinds for k in (*layout.rows, *layout.cols)):
            mod = kinds[layout.probe]
            return layout, int(mod.out_features if layout.gated else mod.in_features)
    expected = " or ".join("/".join(dict.fromkeys((*x.rows, *x.cols))) for x in FFN_LAYOUTS)
    raise LangpruneError(
        f"LAPE cannot find the FFN neurons of {type(layer).__name__}: expected {expected}, "
        f"found {sorted(kinds)}"
    )


class NeuronCounter:
    """Forward hooks that count positive FFN activations into an ActivationCounter.

    Counting is on only inside :meth:`counting`, so other passes through the same layers
    (e.g. the local-SNR pass) are not counted.
    """

    def __init__(self, counter: LP.ActivationCounter, layout: FfnLayout) -> None:
        self.counter = counter
        self.layout = layout
        self._lang: str | None = None

    @contextmanager
    def counting(self, lang: str | None) -> Iterator[None]:
        """Count activations as ``lang`` during the block (None pauses); restores after."""
        before, self._lang = self._lang, lang
        try:
            yield
        finally:
            self._lang = before

    @contextmanager
    def hooked(self, layers: Sequence[nn.Module] | nn.ModuleList) -> Iterator[None]:
        """Hooks on every layer's probe module for the block; always removed."""
        handles = []
        try:
            for index, layer in enumerate(layers):
                module = _find_module(layer, self.layout.probe)
                if self.layout.gated:
                    handles.append(module.register_forward_hook(self._output_hook(index)))
                else:
                    handles.append(module.register_forward_pre_hook(self._input_hook(index)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _output_hook(self, index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Tensor) -> None:
            if self._lang is not None:
                self.counter.update(self._lang, index, output)

        return hook

    def _input_hook(self, index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if self._lang is not None:
                self.counter.update(self._lang, index, args[0])

        return hook


def _find_module(layer: nn.Module, last: str) -> nn.Module:
    for name, module in layer.named_modules():
        if name.rsplit(".", 1)[-1] == last:
            return module
    raise LangpruneError(f"no {last} module in {type(layer).__name__}")

