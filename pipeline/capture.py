"""The layer-wise driver: capture decoder inputs, then calibrate, prune and propagate per layer.

Written once and knows no algorithm: a :class:`~pipeline.pruners.base.LayerPruner` supplies
the statistic and the per-matrix pruning. The driver

1. captures what every decoder layer receives for every calibration batch
   (:func:`capture_layer_inputs`): the hidden states entering layer 0 and each layer's own
   keyword inputs (Gemma 3 gives sliding-window and global layers different attention masks
   and rotary embeddings, so layer 0's keyword inputs are not valid for every layer);
2. for each layer: hooks its ``nn.Linear`` modules, runs the layer to accumulate statistics
   (one statistic per group of linears that read the same input tensor, e.g. q/k/v), prunes,
   and re-runs the pruned layer, whose outputs become the next layer's inputs.

:func:`layerwise_forward` walks the same layers without pruning, for analyses that need each
layer's inputs and outputs (SNR, hidden states). The embedding pass never runs the final norm
or the ``lm_head``: it is stopped by a private exception after the last layer's inputs are known.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pipeline import models
from pipeline.errors import LangpruneError
from pipeline.masks import PackedMask, pack_mask
from pipeline.pruners import LayerPruner, SparsityTarget, Statistic, make_pruner
from pipeline.pruners.masks import all_finite
from pipeline.sparsity import ModuleSparsity, record_module

log = logging.getLogger(__name__)

LayerDoneCallback = Callable[[int, list[ModuleSparsity]], None]


class _StopForward(Exception):
    """Private: ends a forward pass once everything needed from it has been recorded."""


# ---- captured inputs ----------------------------------------------------------------------


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
    layers: Sequence[nn.Module], make_forward: Callable[[int], Callable[..., Any]]
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


# ---- analysis walk --------------------------------------------------------------------------


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


# ---- pruning ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputGroup:
    """Linear modules of one layer that read the same input tensor, in forward order.

    Attributes:
        names: Member names relative to the layer, in call order.
        last_call: Position of the group's last member call among all linear calls of one
            forward of the layer.
        stop: ``(name, occurrence)`` of that last call: a statistics pass for this group can
            end right after it.
    """

    names: tuple[str, ...]
    last_call: int
    stop: tuple[str, int]


def discover_input_groups(
    layer: nn.Module, linears: Mapping[str, nn.Module], inp: LayerInput, index: int
) -> list[InputGroup]:
    """Group ``linears`` by the identity of their input tensor during one forward of ``layer``.

    Groups are ordered by their first call, members by call order; this is both the
    statistics sharing (q/k/v read one tensor) and the order of ``true_sequential``.

    Raises:
        LangpruneError: if a linear is never called (it cannot be calibrated).
    """
    seen: list[tuple[Tensor, list[str]]] = []
    order: list[str] = []

    def record(name: str, x: Tensor) -> None:
        order.append(name)
        for tensor, names in seen:
            if tensor is x:
                if name not in names:
                    names.append(name)
                return
        if not any(name in names for _, names in seen):
            seen.append((x, [name]))

    with input_hooks(linears, record):
        inp.call(layer, index)
    unused = [n for n in linears if n not in order]
    if unused:
        raise LangpruneError(
            f"decoder layer {index}: {', '.join(unused)} never ran during the forward pass, so "
            "it cannot be calibrated"
        )
    groups = []
    for _, names in seen:
        last = max(k for k, called in enumerate(order) if called in names)
        stop = (order[last], order[: last + 1].count(order[last]))
        groups.append(InputGroup(tuple(names), last, stop))
    return groups


@contextmanager
def input_hooks(
    modules: Mapping[str, nn.Module], fn: Callable[[str, Tensor], None]
) -> Iterator[None]:
    """Call ``fn(name, input)`` before each forward of the named modules; hooks always removed."""
    handles = [
        m.register_forward_pre_hook(lambda _m, args, _name=name: fn(_name, args[0]))
        for name, m in modules.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class PruneResult:
    """What :func:`prune_layerwise` did.

    Attributes:
        method: Registered method name.
        target: The sparsity target.
        masks: Full module name -> packed mask (True = pruned), 1 bit per weight.
        records: Per pruned module, the sparsity report row (see :mod:`pipeline.sparsity`).
        n_windows: Calibration windows used (0 for methods without calibration).
        n_tokens: Calibration tokens used.
        seconds: Wall time of the whole prune.
        timings: Seconds spent in ``capture``, ``statistics``, ``prune`` and ``propagate``.
        n_statistics: Statistics accumulated in total (fewer when shared).
        share_statistics: Whether linears reading the same input shared one statistic.
    """

    method: str
    target: SparsityTarget
    masks: dict[str, PackedMask] = field(default_factory=dict)
    records: list[ModuleSparsity] = field(default_factory=list)
    n_windows: int = 0
    n_tokens: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    n_statistics: int = 0
    share_statistics: bool = True


@dataclass
class _Run:
    """Per-call state of :func:`prune_layerwise` (kept out of module scope)."""

    pruner: LayerPruner
    target: SparsityTarget
    device: torch.device
    share: bool
    result: PruneResult
    progress: bool
    # Input groups by (layer class, linear names): grouping follows the code, not the
    # weights, so identical layers (all of Llama's, Gemma 3's sliding and global) share one
    # discovery forward.
    groups: dict[tuple[Any, ...], list[InputGroup]] = field(default_factory=dict)

    def tick(self, key: str, since: float) -> float:
        _sync(self.device)
        now = time.perf_counter()
        self.result.timings[key] = self.result.timings.get(key, 0.0) + now - since
        return now


def _validate_linears(
    layers: nn.ModuleList, prefix: str, target: SparsityTarget, pruner: LayerPruner
) -> None:
    """Shape and NaN checks that would otherwise fail after hours of work."""
    blocksize = getattr(pruner, "blocksize", None)
    if target.m and blocksize is not None and blocksize % target.m:
        raise LangpruneError(
            f"sparsegpt_blocksize={blocksize} must be a multiple of M={target.m} "
            f"for {target.describe()}"
        )
    for i, layer in enumerate(layers):
        linears = models.find_linears(layer)
        if not linears:
            raise LangpruneError(
                f"decoder layer {i} ({type(layer).__name__}) has no nn.Linear to prune"
            )
        for name, lin in linears.items():
            if not all_finite(lin.weight):
                raise LangpruneError(f"{prefix}.{i}.{name}: weight contains NaN or Inf")
            if target.m and lin.in_features % target.m:
                raise LangpruneError(
                    f"layer {i} {name}: in_features={lin.in_features} is not divisible by "
                    f"M={target.m} ({target.describe()})"
                )


def _prune_module(
    run: _Run, index: int, full_name: str, module: nn.Linear, stat: Statistic | None
) -> ModuleSparsity:
    weight = module.weight  # checked for NaN/Inf before any work (_validate_linears)
    outcome = run.pruner.prune(weight.data, stat, run.target)
    record = record_module(index, full_name, weight.data, outcome)
    weight.data.copy_(outcome.weight)
    run.result.masks[full_name] = pack_mask(outcome.mask)
    return record


def _accumulate(
    layer: nn.Module, inputs: Sequence[LayerInput], index: int,
    hooks: Mapping[str, nn.Module], stats: Mapping[str, Statistic], stop: tuple[str, int],
) -> None:
    """Run ``layer`` over all batches, feeding hooked inputs to their statistics.

    Each forward stops right after the ``stop = (name, occurrence)`` linear call: the
    outputs of later modules are not needed for these statistics.
    """
    stop_name, stop_count, seen = stop[0], stop[1], [0]

    def feed(name: str, x: Tensor) -> None:
        if name in stats:
            stats[name].add_batch(x)
        if name == stop_name:
            seen[0] += 1
            if seen[0] == stop_count:
                raise _StopForward

    watched = dict(hooks)
    watched.setdefault(stop_name, dict(models.find_linears(layer))[stop_name])
    with input_hooks(watched, feed):
        for inp in inputs:
            seen[0] = 0
            try:
                inp.call(layer, index)
            except _StopForward:
                pass


def _make_stats(
    run: _Run, linears: Mapping[str, nn.Linear], groups: Sequence[InputGroup]
) -> tuple[dict[str, Statistic], dict[str, Statistic]]:
    """``(by_hooked_module, by_module)``: one statistic per group, or per module if not shared."""
    hooked: dict[str, Statistic] = {}
    owned: dict[str, Statistic] = {}
    for group in groups:
        owners = group.names[:1] if run.share else group.names
        for owner in owners:
            stat = run.pruner.make_statistic(linears[owner].in_features, run.device)
            assert stat is not None  # guaranteed by needs_calibration
            hooked[owner] = stat
        for name in group.names:
            owned[name] = hooked[group.names[0] if run.share else name]
    run.result.n_statistics += len(hooked)
    return hooked, owned


def _check_stats(prefix: str, owned: Mapping[str, Statistic]) -> None:
    bad = [name for name, s in owned.items() if not s.is_finite()]
    if bad:
        raise LangpruneError(
            f"calibration statistics of {', '.join(f'{prefix}.{b}' for b in bad)} contain NaN or "
            "Inf (the layer's inputs overflowed; try dtype=float32)"
        )


def _prune_groups(
    run: _Run, layer: nn.Module, inputs: Sequence[LayerInput], index: int, prefix: str,
    groups: Sequence[InputGroup],
) -> list[ModuleSparsity]:
    """Accumulate statistics for ``groups`` over all batches, then prune their modules."""
    linears = models.find_linears(layer)
    t = time.perf_counter()
    hooked, owned = _make_stats(run, linears, groups)
    stop = max(groups, key=lambda g: g.last_call).stop
    _accumulate(layer, inputs, index, {n: linears[n] for n in hooked}, hooked, stop)
    t = run.tick("statistics", t)
    _check_stats(prefix, owned)
    records = []
    for group in groups:
        records += [_prune_module(run, index, f"{prefix}.{name}", linears[name], owned[name])
                    for name in group.names]
        for name in group.names:  # the group is done: free its statistic (and factor)
            owned[name].release()
    run.tick("prune", t)
    return records


def _prune_calibrated_layer(
    run: _Run, layer: nn.Module, inputs: Sequence[LayerInput], index: int, prefix: str,
    true_sequential: bool,
) -> list[ModuleSparsity]:
    linears = models.find_linears(layer)
    key = (type(layer), tuple(linears))
    if key not in run.groups:
        t = time.perf_counter()
        run.groups[key] = discover_input_groups(layer, linears, inputs[0], index)
        run.tick("statistics", t)
    groups = run.groups[key]
    if not true_sequential:
        return _prune_groups(run, layer, inputs, index, prefix, groups)
    records: list[ModuleSparsity] = []
    for group in groups:  # each group sees the pruned outputs of the groups before it
        records += _prune_groups(run, layer, inputs, index, prefix, [group])
    return records


def _make_run(
    method: str | LayerPruner, target: SparsityTarget, device: torch.device, share: bool,
    progress: bool, options: Mapping[str, Any],
) -> _Run:
    if not isinstance(target, SparsityTarget):
        raise TypeError(f"target must be a SparsityTarget, got {type(target).__name__}")
    pruner = method if isinstance(method, LayerPruner) else make_pruner(method, **options)
    name = pruner.name or type(pruner).__name__
    result = PruneResult(method=name, target=target, share_statistics=share)
    return _Run(pruner, target, torch.device(device), share, result, progress)


def prune_layerwise(
    model: nn.Module,
    windows: Tensor | None,
    method: str | LayerPruner,
    target: SparsityTarget,
    *,
    device: torch.device | str,
    offload: bool = False,
    true_sequential: bool = False,
    batch_size: int = 8,
    on_layer_done: LayerDoneCallback | None = None,
    progress: bool = True,
    sparsegpt_blocksize: int = 128,
    sparsegpt_percdamp: float = 0.01,
    share_statistics: bool = True,
) -> PruneResult:
    """Prune every ``nn.Linear`` of every decoder layer of ``model`` in place, layer by layer.

    For each layer: accumulate the method's statistic from the layer's inputs (which already
    carry the error of the pruned layers before it), prune, and re-run the pruned layer to
    produce the next layer's inputs. Embeddings and ``lm_head`` are not pruned. Methods that
    need no calibration (magnitude) run no forward pass at all.

    Args:
        model: A causal LM. Without ``offload`` it is moved to ``device``; with ``offload`` it
            stays on the CPU and one decoder layer at a time is moved to ``device``.
        windows: Calibration token ids ``[n, seq_len]`` (ignored by magnitude; may be None).
        method: A registered method name (``magnitude``, ``wanda``, ``sparsegpt``) or a pruner.
        target: Sparsity and pattern.
        device: Compute device; statistics live there in float32.
        offload: Move one decoder layer at a time to ``device``.
        true_sequential: Prune groups of linears in forward order (q/k/v, o, gate/up, down),
            re-running the layer between groups so later groups see earlier groups' pruning.
        batch_size: Windows per forward pass.
        on_layer_done: Called as ``on_layer_done(layer_index, records)`` after each layer.
        progress: Show progress bars.
        sparsegpt_blocksize: SparseGPT columns per block.
        sparsegpt_percdamp: SparseGPT damping, fraction of mean(diag H).
        share_statistics: One statistic per group of linears reading the same input (off only
            to measure its benefit).

    Returns:
        A :class:`PruneResult` with packed masks and the sparsity report rows.
    """
    t0 = time.perf_counter()
    options = {"sparsegpt_blocksize": sparsegpt_blocksize, "sparsegpt_percdamp": sparsegpt_percdamp}
    run = _make_run(method, target, device, share_statistics, progress, options)
    if run.pruner.needs_calibration:
        if windows is None:
            raise LangpruneError(f"{run.result.method} needs calibration windows")
        check_windows(windows, batch_size)
    prefix, layers = models.find_decoder_layers(model)
    _validate_linears(layers, prefix, target, run.pruner)
    _prepare(model, run.device, offload)
    with _calibration_mode(model):
        inputs: list[LayerInput] = []
        if run.pruner.needs_calibration:
            assert windows is not None
            t = time.perf_counter()
            with _embedding_placement(model, layers, run.device, offload):
                inputs = _capture(model, layers, windows, batch_size, run.device, progress)
            run.tick("capture", t)
            run.result.n_windows, run.result.n_tokens = windows.shape[0], windows.numel()
        _walk_layers(run, layers, prefix, inputs, offload, true_sequential, on_layer_done)
    run.result.seconds = time.perf_counter() - t0
    return run.result


def _walk_layers(
    run: _Run, layers: nn.ModuleList, prefix: str, inputs: list[LayerInput], offload: bool,
    true_sequential: bool, on_layer_done: LayerDoneCallback | None,
) -> None:
    desc = f"{run.result.method} {run.target.describe()}"
    for i, layer in enumerate(tqdm(layers, desc=desc, disable=not run.progress)):
        with models.onloaded(layer, run.device, offload):
            if run.pruner.needs_calibration:
                records = _prune_calibrated_layer(
                    run, layer, inputs, i, f"{prefix}.{i}", true_sequential
                )
                if i < len(layers) - 1:  # the last layer's outputs feed nothing we prune
                    t = time.perf_counter()
                    _propagate(layer, inputs, i)
                    run.tick("propagate", t)
            else:
                t = time.perf_counter()
                records = [
                    _prune_module(run, i, f"{prefix}.{i}.{name}", lin, None)
                    for name, lin in models.find_linears(layer).items()
                ]
                run.tick("prune", t)
            run.result.records += records
            log.debug("layer %d: %d modules pruned", i, len(records))
            if on_layer_done is not None:
                on_layer_done(i, records)
