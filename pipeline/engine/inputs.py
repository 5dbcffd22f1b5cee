"""Captured decoder-layer inputs: what every layer receives for every calibration batch.

The embedding pass runs the model with each decoder layer replaced by a recorder, and never
runs the final norm or the ``lm_head``: a private exception stops it once the last layer's
inputs are known. Gemma 3 gives sliding-window and global layers different attention masks
and rotary embeddings, so every layer's own keyword inputs are kept, not layer 0's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pipeline import models
from pipeline.errors import LangpruneError


class _StopForward(Exception):
    """Private: ends a forward pass once everything needed from it has been recorded."""


@dataclass
class LayerInput:
    """One calibration batch at the decoder stack.

    Attributes:
        hidden_states: Input of the current layer, ``[batch, seq, hidden]``; the driver replaces
            it with each layer's output as it walks down the stack.
        layer_args: Per decoder layer, positional inputs after the hidden states (usually ``()``).
        layer_kwargs: Per decoder layer, the keyword inputs the model passed it (attention
            mask, position ids, rotary position embeddings, ...). Tensors shared between layers
            are shared here too, not copied.
    """

    hidden_states: Tensor
    layer_args: list[tuple[Any, ...]]
    layer_kwargs: list[dict[str, Any]]

    def call(self, layer: nn.Module, index: int, hidden_states: Tensor | None = None) -> Tensor:
        """Run ``layer`` as decoder layer ``index`` on this batch; returns its hidden states.

        Args:
            layer: The module to run (decoder layer ``index``, or a stand-in for it).
            index: Which layer's keyword inputs to use.
            hidden_states: Override of :attr:`hidden_states` (e.g. another model's states).
        """
        x = self.hidden_states if hidden_states is None else hidden_states
        return _hidden_of(layer(x, *self.layer_args[index], **self.layer_kwargs[index]))


def _hidden_of(output: Any) -> Tensor:
    """Decoder layers of transformers 5 return a tensor; older ones a tuple led by it."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot read hidden states from a decoder layer output of {type(output)}")


def check_windows(windows: Tensor, batch_size: int) -> None:
    """Raise :class:`LangpruneError` unless ``windows`` is a non-empty ``[n, seq_len]`` of ids."""
    if not isinstance(windows, Tensor) or windows.dim() != 2 or windows.numel() == 0:
        shape = tuple(windows.shape) if isinstance(windows, Tensor) else type(windows).__name__
        raise LangpruneError(
            f"calibration windows must be a non-empty [n, seq_len] tensor, got {shape}"
        )
    if windows.dtype not in (torch.int64, torch.int32):
        raise LangpruneError(f"calibration windows must hold token ids (int), got {windows.dtype}")
    if batch_size < 1:
        raise LangpruneError(f"batch_size must be >= 1, got {batch_size}")


@contextmanager
def _swapped_forwards(
    layers: Sequence[nn.Module] | nn.ModuleList, make_forward: Callable[[int], Callable[..., Any]]
) -> Iterator[None]:
    """Temporarily replace each layer's ``forward`` (an instance attribute shadows the class's).

    Any instance-level forward already present (e.g. an accelerate hook) is restored after.
    """
    saved = [layer.__dict__.get("forward") for layer in layers]
    try:
        for i, layer in enumerate(layers):
            layer.forward = make_forward(i)
        yield
    finally:
        for layer, old in zip(layers, saved, strict=True):
            if old is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = old


def _record_forward(slot: dict[str, Any], last: int, index: int) -> Callable[..., Any]:
    """A stand-in forward for layer ``index``: records its inputs, passes hidden states on."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if index == 0:
            slot["hidden"] = hidden
        slot["args"][index] = tuple(args[1:])
        slot["kwargs"][index] = dict(kwargs)
        if index == last:
            raise _StopForward
        return hidden

    return forward


def _capture(
    model: nn.Module, layers: nn.ModuleList, windows: Tensor, batch_size: int,
    device: torch.device, progress: bool,
) -> list[LayerInput]:
    n = len(layers)
    slot: dict[str, Any] = {}
    inputs: list[LayerInput] = []
    batches = windows.split(batch_size)
    with _swapped_forwards(layers, partial(_record_forward, slot, n - 1)):
        for batch in tqdm(batches, desc="capture", disable=not progress, leave=False):
            slot.update(hidden=None, args=[None] * n, kwargs=[None] * n)
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
            missing = [i for i, kw in enumerate(slot["kwargs"]) if kw is None]
            if slot["hidden"] is None or missing:
                raise RuntimeError(
                    f"{type(model).__name__}'s forward never called decoder layers {missing}"
                )
            inputs.append(LayerInput(slot["hidden"], slot["args"], slot["kwargs"]))
    return inputs


@contextmanager
def _calibration_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and inference mode for the block; the training flag is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


@contextmanager
def _embedding_placement(
    model: nn.Module, layers: nn.ModuleList, device: torch.device, offload: bool
) -> Iterator[None]:
    """With offload, put everything but the decoder layers (and an untied lm_head) on device."""
    if not offload:
        yield
        return
    keep = [*layers, *models.output_only_modules(model)]
    home = models.model_device(model)
    models.move_tensors(model, device, skip=keep)
    try:
        yield
    finally:
        models.move_tensors(model, home, skip=keep)


def _prepare(model: nn.Module, device: torch.device, offload: bool) -> tuple[str, nn.ModuleList]:
    """Find the layers; without offload, put the whole model on ``device``."""
    name, layers = models.find_decoder_layers(model)
    if not offload:
        models.move_module(model, device)
    return name, layers


def capture_layer_inputs(
    model: nn.Module,
    windows: Tensor,
    batch_size: int,
    device: torch.device,
    *,
    offload: bool = False,
    progress: bool = False,
) -> list[LayerInput]:
    """Inputs of every decoder layer for all calibration windows, one entry per batch.

    Runs the model once per batch with every decoder layer replaced by a recorder that
    passes its hidden states through unchanged; the pass stops (without the final norm or
    ``lm_head``) when the last layer has been reached.

    Args:
        model: A causal LM (see :func:`pipeline.models.find_decoder_layers`).
        windows: Token ids ``[n, seq_len]`` (no padding).
        batch_size: Windows per forward pass.
        device: Compute device; the captured tensors live there.
        offload: Keep the decoder layers on the CPU (only the embeddings move to ``device``).
        progress: Show a progress bar.
    """
    check_windows(windows, batch_size)
    _, layers = _prepare(model, device, offload)
    with _calibration_mode(model), _embedding_placement(model, layers, device, offload):
        return _capture(model, layers, windows, batch_size, device, progress)


def run_layer(
    layer: nn.Module, inputs: Sequence[LayerInput], index: int, *, progress: bool = False
) -> list[Tensor]:
    """Run decoder layer ``index`` (or a stand-in) on every captured batch; outputs per batch.

    Runs under ``torch.inference_mode``.
    """
    batches = tqdm(inputs, desc=f"layer {index}", disable=not progress, leave=False)
    with torch.inference_mode():
        return [inp.call(layer, index) for inp in batches]


def _propagate(layer: nn.Module, inputs: Sequence[LayerInput], index: int) -> None:
    """Replace each batch's hidden states by the layer's output (one batch at a time)."""
    for inp in inputs:
        inp.hidden_states = inp.call(layer, index)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
