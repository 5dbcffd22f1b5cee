"""LAPE: language activation probability entropy and language-specific FFN neurons.

Definitions (docs/science.md#lape), after Tang et al., "Language-Specific Neurons: The Key to
Multilingual Capabilities in Large Language Models", ACL 2024 (eq. 1-2 and their released
selection code):

- Neuron (l, j) is the j-th FFN unit of decoder layer l; for gated MLPs its activation is
  act_fn(gate_proj x)_j, which is > 0 exactly when (gate_proj x)_j > 0 for SiLU and GELU, so
  either tensor can be counted.
- p_l,j^lang = fraction of the language's (non-padding) tokens where the activation is > 0.
- p^ = p / sum_lang p and LAPE = -sum_lang p^ log p^ (0 log 0 = 0). A neuron that never fires
  in any language has no distribution: its LAPE is NaN.
- Selection: the threshold is the ``filter_quantile`` quantile of all p (all languages,
  layers and neurons), taken as the k-th smallest value with k = round(N * q), as Tang et al.
  do. Neurons where no language's p exceeds it are dropped; of the rest, the
  round(top_rate * number of neurons) lowest-LAPE ones over all layers are kept (fewer if
  fewer survive the filter; ties broken by layer, then neuron index); each kept neuron is
  assigned to every language whose p exceeds the threshold.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from analysis.iou import parse_module_name
from analysis.neurons import FFN_LAYOUTS
from pipeline.errors import LangpruneError
from pipeline.registry import suggest

Neuron = tuple[int, int]  # (layer, neuron index)
# Gated MLP (Llama, Gemma, Qwen2, Mistral, Cohere), the first row of the adapter table
# analysis.neurons.FFN_LAYOUTS: neuron j owns row j of the [inter, d] gate/up projections and
# column j of the [d, inter] down projection.
GATED_ROWS = FFN_LAYOUTS[0].rows
GATED_COLS = FFN_LAYOUTS[0].cols


class ActivationCounter:
    """Streaming count of positive FFN activations per language, layer and neuron.

    Lifecycle: ``update(lang, layer, act, mask)`` from a forward hook for every batch of
    every language, then :meth:`probabilities`. Counts are exact integers (int64 on the CPU),
    so the result does not depend on batching.

    Args:
        languages: Language codes; their order is the first axis of :meth:`probabilities`.
        n_layers: Number of decoder layers.
        n_neurons: FFN units per layer (the MLP intermediate size).
    """

    def __init__(self, languages: Sequence[str], n_layers: int, n_neurons: int,
                 per_window: bool = False) -> None:
        if len(set(languages)) != len(languages) or not languages:
            raise LangpruneError(f"languages must be distinct and non-empty: {list(languages)}")
        self.languages = tuple(languages)
        self._index = {lang: i for i, lang in enumerate(self.languages)}
        self.over_zero = torch.zeros(len(languages), n_layers, n_neurons, dtype=torch.int64)
        self.tokens = torch.zeros(len(languages), n_layers, dtype=torch.int64)
        # per_window: (language, layer) -> one [windows, neurons] count per unmasked batch
        self.windows: dict[tuple[str, int], list[Tensor]] | None = {} if per_window else None

    def update(self, lang: str, layer: int, act: Tensor, mask: Tensor | None = None) -> None:
        """Count one batch of activations.

        Args:
            lang: Language of the text.
            layer: Decoder layer index.
            act: Activations (or gate pre-activations) [..., n_neurons], any device.
            mask: Bool/0-1 tensor of ``act.shape[:-1]``; only tokens with 1 are counted
                (exclude padding). None counts every token.
        """
        if lang not in self._index:
            raise LangpruneError(
                f"language {lang!r} is not counted; known: "
                f"{', '.join(self.languages)}{suggest(lang, list(self._index))}"
            )
        n_neurons = self.over_zero.shape[2]
        if act.shape[-1] != n_neurons:
            raise ValueError(f"expected {n_neurons} neurons, got activations {tuple(act.shape)}")
        flat = act.detach().reshape(-1, n_neurons)
        if mask is not None:
            if tuple(mask.shape) != tuple(act.shape[:-1]):
                raise ValueError(
                    f"mask {tuple(mask.shape)} does not match activations {tuple(act.shape)}"
                )
            flat = flat[mask.reshape(-1).to(flat.device).bool()]
        i = self._index[lang]
        self.over_zero[i, layer] += (flat > 0).sum(dim=0).cpu()
        if self.windows is not None and mask is None and act.dim() == 3:
            self.windows.setdefault((lang, layer), []).append((act.detach() > 0).sum(1).cpu())
        self.tokens[i, layer] += flat.shape[0]

    def merge(self, other: ActivationCounter) -> None:
        """Add the counts of another counter over the same languages and shape."""
        if other.languages != self.languages or other.over_zero.shape != self.over_zero.shape:
            raise ValueError("cannot merge counters of different languages or shapes")
        self.over_zero += other.over_zero
        self.tokens += other.tokens

    def window_counts(self, lang: str) -> Tensor:
        """``[windows, layers, neurons]`` counts of ``lang`` (needs ``per_window=True``)."""
        if self.windows is None:
            raise ValueError("this counter does not record per-window counts")
        layers = self.over_zero.shape[1]
        return torch.stack([torch.cat(self.windows[(lang, i)]) for i in range(layers)], dim=1)

    def probabilities(self) -> Tensor:
        """p: float64 [languages, layers, neurons], the fraction of tokens with act > 0.

        Raises:
            LangpruneError: if some language never reached some layer.
        """
        if bool((self.tokens == 0).any()):
            lang, layer = (int(v) for v in (self.tokens == 0).nonzero()[0])
            raise LangpruneError(
                f"no tokens counted for language {self.languages[lang]!r} at layer {layer}"
            )
        return self.over_zero.double() / self.tokens.double()[..., None]


def save_counts(counter: ActivationCounter, path: str | os.PathLike[str]) -> None:
    """Write the counts as safetensors (``over_zero``, ``tokens``; languages in the metadata).

    The one writer of a LAPE counts file (per run, dense, and in the dense cache).
    """
    save_file({"over_zero": counter.over_zero, "tokens": counter.tokens}, path,
              metadata={"languages": json.dumps(list(counter.languages))})


def load_counts(path: str | os.PathLike[str], languages: Sequence[str]) -> ActivationCounter:
    """The counter :func:`save_counts` wrote, over ``languages`` (in the file's order)."""
    counts = load_file(str(path))
    _, n_layers, n_neurons = counts["over_zero"].shape
    counter = ActivationCounter(languages, n_layers, n_neurons)
    counter.over_zero, counter.tokens = counts["over_zero"], counts["tokens"]
    return counter


def counts_file_scores(path: str | os.PathLike[str]) -> Tensor:
    """LAPE scores ``[layers, neurons]`` of the counts in a :func:`save_counts` file.

    p is over_zero / tokens as in :meth:`ActivationCounter.probabilities`, without its check
    that every language reached every layer (a report shows what the file holds).
    """
    counts = load_file(str(path))
    p = counts["over_zero"].double() / counts["tokens"].double()[..., None]
    return lape_scores(p)


def lape_scores(p: Tensor) -> Tensor:
    """LAPE of every neuron.

    Args:
        p: Activation probabilities [languages, layers, neurons].

    Returns:
        float64 [layers, neurons]: -sum p^ log p^ with p^ = p / sum_lang p; NaN where a
        neuron never fires in any language.
    """
    p64 = p.detach().to("cpu", torch.float64)
    total = p64.sum(dim=0, keepdim=True)
    norm = p64 / total  # NaN where total == 0, kept as the honest "undefined"
    safe_log = torch.where(norm > 0, norm.log(), torch.zeros_like(norm))
    return -(norm * safe_log).sum(dim=0)


def activation_threshold(p: Tensor, quantile: float = 0.95) -> float:
    """The ``quantile`` of all p as the k-th smallest value, k = round(N * quantile)."""
    if not 0.0 < quantile <= 1.0:
        raise LangpruneError(f"LAPE filter quantile must lie in (0, 1], got {quantile}")
    flat = p.detach().to("cpu", torch.float64).reshape(-1)
    k = min(max(round(flat.numel() * quantile), 1), flat.numel())
    return float(flat.kthvalue(k).values)


def select_language_specific(
    p: Tensor, languages: Sequence[str], top_rate: float = 0.01, filter_quantile: float = 0.95
) -> dict[str, set[Neuron]]:
    """Language-specific neurons by LAPE (see the module docstring for the exact rule).

    Args:
        p: Activation probabilities [languages, layers, neurons].
        languages: Names of the first axis of ``p``.
        top_rate: Fraction of all neurons (over all layers) kept by lowest LAPE.
        filter_quantile: Quantile of all p a language's p must exceed.

    Returns:
        Language -> set of (layer, neuron); every language is a key (possibly empty).
    """
    if p.ndim != 3 or p.shape[0] != len(languages):
        raise LangpruneError(
            f"p must be [languages={len(languages)}, layers, neurons], got {tuple(p.shape)}"
        )
    if not 0.0 < top_rate <= 1.0:
        raise LangpruneError(f"LAPE top rate must lie in (0, 1], got {top_rate}")
    p64 = p.detach().to("cpu", torch.float64)
    n_layers, n_neurons = p64.shape[1:]
    above = p64 > activation_threshold(p64, filter_quantile)
    candidate = above.any(dim=0).reshape(-1)
    lape = torch.where(candidate, lape_scores(p64).reshape(-1), math.inf)
    n_keep = min(round(n_layers * n_neurons * top_rate), int(candidate.sum()))
    kept = torch.sort(lape, stable=True).indices[:n_keep]
    selected: dict[str, set[Neuron]] = {lang: set() for lang in languages}
    flat_above = above.reshape(len(languages), -1)
    for idx in kept.tolist():
        neuron = divmod(idx, n_neurons)
        for k in flat_above[:, idx].nonzero().flatten().tolist():
            selected[languages[k]].add(neuron)
    return selected


def selection_overlap(a: Mapping[str, set[Neuron]], b: Mapping[str, set[Neuron]]) -> pd.DataFrame:
    """Per-language overlap of two neuron selections (e.g. dense vs pruned).

    Returns:
        One row per language in either selection (sorted) with ``n_a``, ``n_b``, ``n_both``
        and ``jaccard`` = |A and B| / |A or B| (NaN when both are empty).
    """
    rows = []
    for lang in sorted(set(a) | set(b)):
        sa, sb = set(a.get(lang, ())), set(b.get(lang, ()))
        union = len(sa | sb)
        rows.append(
            {
                "lang": lang,
                "n_a": len(sa),
                "n_b": len(sb),
                "n_both": len(sa & sb),
                "jaccard": len(sa & sb) / union if union else math.nan,
            }
        )
    return pd.DataFrame(rows, columns=["lang", "n_a", "n_b", "n_both", "jaccard"])


def _ffn_modules(masks: Mapping[str, Tensor], kinds: Sequence[str]) -> dict[tuple[int, str], str]:
    """(layer, module type) -> module name, for the FFN projections among ``masks``."""
    found: dict[tuple[int, str], str] = {}
    for name in masks:
        layer, kind = parse_module_name(name)
        if layer is None or kind not in kinds:
            continue
        if (layer, kind) in found:
            raise LangpruneError(
                f"two {kind} modules in layer {layer}: {found[(layer, kind)]}, {name}"
            )
        found[(layer, kind)] = name
    return found


def removed_fraction(
    neurons: Mapping[str, set[Neuron]],
    masks: Mapping[str, Tensor],
    rows: Sequence[str] = GATED_ROWS,
    cols: Sequence[str] = GATED_COLS,
) -> dict[str, float]:
    """Fraction of each language's specific-neuron weights that the mask pruned.

    A neuron j of layer l owns row j of every ``rows`` projection (gate_proj, up_proj:
    [intermediate, hidden]) and column j of every ``cols`` projection (down_proj:
    [hidden, intermediate]). For a language: pruned entries over all weights its neurons own.
    Every neuron owns the same number of weights, so this is also the mean per-neuron
    fraction. Pass ``{"all": every neuron}`` to get the reference over all FFN neurons.

    Args:
        neurons: Language -> set of (layer, neuron).
        masks: Module name -> bool mask (True = pruned), e.g. ``model.layers.3.mlp.up_proj``.
        rows: Module types (last name component) whose rows belong to neurons.
        cols: Module types whose columns belong to neurons.

    Returns:
        Language -> removed fraction in [0, 1]; NaN for a language without neurons.

    Raises:
        LangpruneError: if a layer with selected neurons lacks one of the projections.
    """
    modules = _ffn_modules(masks, (*rows, *cols))
    result: dict[str, float] = {}
    for lang in sorted(neurons):
        by_layer: dict[int, list[int]] = defaultdict(list)
        for layer, j in neurons[lang]:
            by_layer[layer].append(j)
        pruned = total = 0
        for layer in sorted(by_layer):
            for kind in (*rows, *cols):
                if (layer, kind) not in modules:
                    raise LangpruneError(f"no {kind} mask for layer {layer}")
                mask = masks[modules[(layer, kind)]]
                idx = torch.tensor(sorted(by_layer[layer]), device=mask.device)
                part = mask[idx] if kind in rows else mask[:, idx]
                pruned += int(part.sum())
                total += part.numel()
        result[lang] = pruned / total if total else math.nan
    return result
