"""Per-language calibration statistics of the dense model, and pruning from their blends.

The fast blend search (docs/science.md#calibration-blend-search) walks the *dense* model
once per pool language and keeps, per decoder layer and input group, the pruner's own
statistic built with ``keep_windows=True`` (its :meth:`~pipeline.pruners.base.Statistic.
blend_state`). A blend is then pruned without any forward pass: the statistic class combines
the languages' states for the blend's window counts (:meth:`Statistic.combine`) and the
pruner prunes every matrix from it, exactly as the engine would. Nothing here names a
method: a new pruner with a new statistic works here once its statistic can combine.

Where this differs from the engine (:func:`pipeline.engine.prune_layerwise`): every layer
sees the dense model's inputs (no error propagation; ``true_sequential`` has no effect).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline import models
from pipeline.engine.groups import InputGroup, discover_input_groups, input_hooks
from pipeline.engine.inputs import LayerInput, capture_layer_inputs
from pipeline.errors import LangpruneError
from pipeline.pruners import STATISTICS, LayerPruner, SparsityTarget, Statistic

log = logging.getLogger(__name__)

STATS_FORMAT = "langprune.blendstats/2"


@dataclass
class GroupStats:
    """One input group's statistic for one language.

    Attributes:
        names: Member names relative to the decoder layer (the first one is hooked).
        tensor: The statistic's :meth:`~pipeline.pruners.base.Statistic.blend_state`.
    """

    names: tuple[str, ...]
    tensor: Tensor


@dataclass
class LanguageStats:
    """The statistics of one language's calibration windows, per layer and input group.

    Attributes:
        lang: Language code.
        kind: The statistic class (e.g. ``ColumnSquares``); it knows how parts combine.
        n_windows: Windows the statistics were accumulated over.
        layers: Per decoder layer, per input group.
    """

    lang: str
    kind: type[Statistic]
    n_windows: int
    layers: list[list[GroupStats]]


def combine_stats(stats: Mapping[str, LanguageStats], counts: Mapping[str, int], layer: int,
                  group: int, device: torch.device | str = "cpu") -> Statistic:
    """The blend's statistic of one group: ``counts[lang]`` windows of each language."""
    kinds = {stats[lang].kind for lang in counts}
    if len(kinds) != 1:
        raise LangpruneError(f"statistics of different kinds cannot be blended: {kinds}")
    parts = [(stats[lang].layers[layer][group].tensor, stats[lang].n_windows, count)
             for lang, count in counts.items() if count > 0]
    return kinds.pop().combine(parts, torch.device(device))


def _layer_stats(layer: nn.Module, inputs: list[LayerInput], index: int,
                 groups: Sequence[InputGroup], pruner: LayerPruner,
                 device: torch.device) -> list[GroupStats]:
    """One forward of ``layer`` over every batch: each group's statistic; outputs kept."""
    linears = models.find_linears(layer)
    stats: dict[str, Statistic] = {}
    for group in groups:
        stat = pruner.make_statistic(linears[group.names[0]].in_features, device,
                                     keep_windows=True)
        if stat is None:
            raise LangpruneError(f"{pruner.name} uses no calibration data")
        stats[group.names[0]] = stat
    hooked = {name: linears[name] for name in stats}
    with input_hooks(hooked, lambda name, x: stats[name].add_batch(x)), torch.inference_mode():
        for inp in inputs:
            inp.hidden_states = inp.call(layer, index)  # the next layer's (dense) inputs
    return [GroupStats(tuple(g.names), stats[g.names[0]].blend_state()) for g in groups]


def collect_language_stats(model: nn.Module, windows: Tensor, lang: str, pruner: LayerPruner,
                           *, device: torch.device, batch_size: int = 8,
                           offload: bool = False) -> LanguageStats:
    """Walk the dense model over one language's windows, keeping every group's statistic.

    Groups are found as the engine finds them (:func:`~pipeline.engine.discover_input_groups`),
    so a blend's statistic and the engine's belong to the same linears.
    """
    if pruner.statistic is None:
        raise LangpruneError(f"{pruner.name} uses no calibration data: every blend prunes alike")
    inputs = capture_layer_inputs(model, windows, batch_size, device, offload=offload)
    _, layers = models.find_decoder_layers(model)
    found: dict[tuple[Any, ...], list[InputGroup]] = {}
    out: list[list[GroupStats]] = []
    for i, layer in enumerate(layers):
        with models.onloaded(layer, device, offload), torch.inference_mode():
            linears = models.find_linears(layer)
            key = (type(layer), tuple(linears))
            if key not in found:
                found[key] = discover_input_groups(layer, linears, inputs[0], i)
            out.append(_layer_stats(layer, inputs, i, found[key], pruner, device))
    return LanguageStats(lang, pruner.statistic, int(windows.shape[0]), out)


@torch.no_grad()
def prune_from_stats(model: nn.Module, stats: Mapping[str, LanguageStats],
                     counts: Mapping[str, int], pruner: LayerPruner, target: SparsityTarget,
                     *, device: torch.device, offload: bool = False) -> float:
    """Prune every decoder linear in place from the blend's combined statistics.

    No forward pass; one combined statistic per group (its derived quantities, e.g. a
    factorisation, are shared by the group's linears as in the engine).

    Returns:
        The achieved sparsity over all pruned linears.
    """
    pruner.check_target(target)
    _, layers = models.find_decoder_layers(model)
    any_lang = next(iter(stats.values()))
    pruned = total = 0
    for i, layer in enumerate(layers):
        with models.onloaded(layer, device, offload):
            linears = models.find_linears(layer)
            for j, group in enumerate(any_lang.layers[i]):
                stat = combine_stats(stats, counts, i, j, device)
                for name in group.names:
                    w = linears[name].weight
                    outcome = pruner.prune(w.data, stat, target)
                    w.data.copy_(outcome.weight)
                    pruned += int(outcome.mask.sum())
                    total += outcome.mask.numel()
                stat.release()
    return pruned / max(total, 1)


def save_stats(stats: LanguageStats, path: Path) -> None:
    """Write ``stats`` as one safetensors file (atomically: temp file, then rename)."""
    from safetensors.torch import save_file

    tensors = {f"{i}.{j}": g.tensor.detach().cpu().contiguous()
               for i, layer in enumerate(stats.layers) for j, g in enumerate(layer)}
    meta = {"format": STATS_FORMAT, "lang": stats.lang, "kind": stats.kind.__name__,
            "n_windows": str(stats.n_windows),
            "groups": json.dumps([[list(g.names) for g in layer] for layer in stats.layers])}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:  # a full disk or an interrupt leaves no partial file (a cache miss is cheap)
        tmp.unlink(missing_ok=True)


def load_stats(path: Path, device: torch.device) -> LanguageStats | None:
    """Read a file written by :func:`save_stats`; None if absent, unreadable or of another
    format (safetensors only: a pickle put there is refused, never loaded)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != STATS_FORMAT or meta.get("kind") not in STATISTICS:
                return None
            layers = [[GroupStats(tuple(names), f.get_tensor(f"{i}.{j}").to(device))
                       for j, names in enumerate(groups)]
                      for i, groups in enumerate(json.loads(meta["groups"]))]
    except Exception as e:  # a corrupt cache file is recomputed, never fatal
        log.warning("ignoring unreadable statistics cache %s: %s", path, e)
        return None
    return LanguageStats(meta["lang"], STATISTICS[meta["kind"]], int(meta["n_windows"]), layers)
