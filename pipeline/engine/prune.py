"""The layer-wise pruning driver: calibrate, prune and propagate, one decoder layer at a time.

Written once and knows no algorithm: a :class:`~pipeline.pruners.base.LayerPruner` supplies
the statistic and the per-matrix pruning. For each layer the driver hooks its ``nn.Linear``
modules, runs the layer to accumulate statistics (one statistic per group of linears that
read the same input tensor, e.g. q/k/v), prunes, and re-runs the pruned layer, whose outputs
become the next layer's inputs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pipeline import models
from pipeline.engine.groups import InputGroup, discover_groups, input_hooks
from pipeline.engine.inputs import (
    LayerInput,
    _calibration_mode,
    _capture,
    _embedding_placement,
    _prepare,
    _propagate,
    _StopForward,
    _sync,
    check_windows,
)
from pipeline.engine.sequential import PausedForwards
from pipeline.errors import LangpruneError
from pipeline.masks import PackedMask, pack_mask
from pipeline.pruners import LayerPruner, SparsityTarget, Statistic
from pipeline.pruners.masks import all_finite
from pipeline.sparsity import ModuleSparsity, record_module

log = logging.getLogger(__name__)

PROBE_TOKENS = 16  # tokens of the input on which a layer's groups are discovered
LayerDoneCallback = Callable[[int, list[ModuleSparsity]], None]


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
    layer_targets: list[float] = field(default_factory=list)


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
    layer_targets: list[SparsityTarget] = field(default_factory=list)
    probe: LayerInput | None = None  # a few tokens of one window, to discover groups cheaply

    def tick(self, key: str, since: float) -> float:
        _sync(self.device)
        now = time.perf_counter()
        self.result.timings[key] = self.result.timings.get(key, 0.0) + now - since
        return now


def _validate_linears(
    layers: nn.ModuleList, prefix: str, target: SparsityTarget, pruner: LayerPruner
) -> None:
    """Shape and NaN checks that would otherwise fail after hours of work."""
    pruner.check_target(target)
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
    models.set_weight(weight, outcome.weight)
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
        candidates = [inputs[0]] if run.probe is None else [run.probe, inputs[0]]
        run.groups[key] = discover_groups(layer, linears, candidates, index)
        run.tick("statistics", t)
    groups = run.groups[key]
    prune = _prune_sequential if true_sequential else _prune_groups
    records = prune(run, layer, inputs, index, prefix, groups)
    if run.probe is not None:  # the probe follows the batches down the (pruned) stack
        run.probe.hidden_states = run.probe.call(layer, index)
    return records


def _prune_sequential(
    run: _Run, layer: nn.Module, inputs: Sequence[LayerInput], index: int, prefix: str,
    groups: Sequence[InputGroup],
) -> list[ModuleSparsity]:
    """``true_sequential`` in one forward per batch: each group is pruned once every batch
    has reached it, and the forwards go on through the pruned weights; their outputs become
    the next layer's inputs (:mod:`pipeline.engine.sequential`)."""
    linears = models.find_linears(layer)
    owned: dict[str, Statistic] = {}
    by_first: dict[str, list[Statistic]] = {}

    def feed(name: str, x: Tensor) -> None:  # the group's members all read this x
        for stat in by_first[name]:
            stat.add_batch(x)

    records: list[ModuleSparsity] = []
    firsts = {g.names[0]: linears[g.names[0]] for g in groups}
    t = time.perf_counter()
    with PausedForwards(layer, inputs, index, firsts, feed) as forwards:
        for group in groups:
            hooked, group_owned = _make_stats(run, linears, [group])
            owned.update(group_owned)
            by_first[group.names[0]] = list(hooked.values())
            at = forwards.advance()
            if any(a != group.names[0] for a in at):
                raise LangpruneError(f"{prefix}: the forward reached {sorted(set(map(str, at)))} "
                                     f"where {group.names[0]} was expected; true_sequential "
                                     "needs each group's first linear called once, in order")
            t = run.tick("statistics", t)
            _check_stats(prefix, group_owned)
            records += [_prune_module(run, index, f"{prefix}.{name}", linears[name],
                                      owned[name]) for name in group.names]
            for stat in hooked.values():
                stat.release()
            t = run.tick("prune", t)
        if any(a is not None for a in forwards.advance()):
            raise LangpruneError(f"{prefix}: a forward paused after the last group")
        for inp, out in zip(inputs, forwards.outputs(), strict=True):
            inp.hidden_states = out
    run.tick("propagate", t)
    return records


def _layer_targets(target: SparsityTarget, sparsities: Sequence[float] | None,
                   n_layers: int) -> list[SparsityTarget]:
    """One target per decoder layer: ``target`` everywhere, or the given sparsities."""
    if sparsities is None:
        return [target] * n_layers
    if target.m:
        raise LangpruneError(f"per-layer sparsities need an unstructured target, not "
                             f"{target.describe()}")
    if len(sparsities) != n_layers:
        raise LangpruneError(f"{len(sparsities)} layer sparsities given for {n_layers} layers")
    return [SparsityTarget(float(s)) for s in sparsities]


def _make_run(
    pruner: LayerPruner, target: SparsityTarget, device: torch.device | str, share: bool,
    progress: bool,
) -> _Run:
    if not isinstance(pruner, LayerPruner):
        raise TypeError(f"pruner must be a LayerPruner, got {type(pruner).__name__}")
    if not isinstance(target, SparsityTarget):
        raise TypeError(f"target must be a SparsityTarget, got {type(target).__name__}")
    name = pruner.name or type(pruner).__name__
    result = PruneResult(method=name, target=target, share_statistics=share)
    return _Run(pruner, target, torch.device(device), share, result, progress)


def prune_layerwise(
    model: nn.Module,
    windows: Tensor | None,
    pruner: LayerPruner,
    target: SparsityTarget,
    *,
    device: torch.device | str,
    offload: bool = False,
    true_sequential: bool = False,
    batch_size: int = 8,
    on_layer_done: LayerDoneCallback | None = None,
    progress: bool = True,
    share_statistics: bool = True,
    layer_sparsities: Sequence[float] | None = None,
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
        pruner: The method, with its options (:func:`pipeline.pruners.make_pruner`, or
            :func:`pipeline.pruners.pruner_from_config` for a config's ``PruneCfg``).
        target: Sparsity and pattern.
        device: Compute device; statistics live there in float32.
        offload: Move one decoder layer at a time to ``device``.
        true_sequential: Prune groups of linears in forward order (q/k/v, o, gate/up, down),
            so later groups see earlier groups' pruning; still one forward of each layer per
            batch (each paused at every group until the group is pruned).
        batch_size: Windows per forward pass.
        on_layer_done: Called as ``on_layer_done(layer_index, records)`` after each layer.
        progress: Show progress bars.
        share_statistics: One statistic per group of linears reading the same input (off only
            to measure its benefit).
        layer_sparsities: One unstructured sparsity per decoder layer (e.g. OWL's,
            :mod:`pipeline.engine.owl`) instead of ``target``'s everywhere.

    Returns:
        A :class:`PruneResult` with packed masks and the sparsity report rows.
    """
    t0 = time.perf_counter()
    run = _make_run(pruner, target, device, share_statistics, progress)
    n_layers = len(models.find_decoder_layers(model)[1])
    run.layer_targets = _layer_targets(target, layer_sparsities, n_layers)
    run.result.layer_targets = [t.sparsity for t in run.layer_targets]
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
                probe = windows[:1, :PROBE_TOKENS]
                run.probe = _capture(model, layers, probe, 1, run.device, False)[0]
            run.tick("capture", t)
            run.result.n_windows, run.result.n_tokens = windows.shape[0], windows.numel()
        _walk_layers(run, layers, prefix, inputs, offload, true_sequential, on_layer_done)
    run.result.seconds = time.perf_counter() - t0
    return run.result


def _walk_layers(
    run: _Run, layers: nn.ModuleList, prefix: str, inputs: list[LayerInput], offload: bool,
    true_sequential: bool, on_layer_done: LayerDoneCallback | None,
) -> None:
    desc = f"{run.result.method} {run.result.target.describe()}"
    for i, layer in enumerate(tqdm(layers, desc=desc, disable=not run.progress)):
        run.target = run.layer_targets[i]
        with models.onloaded(layer, run.device, offload):
            if run.pruner.needs_calibration:
                records = _prune_calibrated_layer(
                    run, layer, inputs, i, f"{prefix}.{i}", true_sequential
                )
                # the last layer's outputs feed nothing we prune; sequential mode has them
                if i < len(layers) - 1 and not true_sequential:
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
