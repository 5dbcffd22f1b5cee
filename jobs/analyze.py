"""The ``analyze`` job: mask IoU across a sweep, then SNR, LSAR and LAPE for each pruned run.

Everything is recomputed from the tracking store plus the model and the bundled evaluation
text: a member run contributes only its params and its ``masks/masks.safetensors``.

1. **IoU** (:func:`analyze_iou`): every pair of member runs of the same method, on the packed
   masks (popcount, one module at a time), logged with the sweep parent run: per-pair
   per-module / per-layer / per-module-type / overall tables, the language x language
   matrix per method (intra-language on the diagonal), headline metrics and heatmaps with
   the random baseline s/(2-s).
2. **Per-run analyses** (:func:`analyze_member`) for members not yet tagged
   ``langprune.analysis=done`` (or all with ``force``). The dense model is loaded once; each
   run's masks are applied to it (``pipeline.masks.apply_masks``, bit-exact zeros) and the
   dense weights are restored after (:class:`pipeline.models.DenseSnapshot`). On FLORES
   windows of every evaluation language (``analysis_tokens`` per language, windows of
   ``analysis_seq_len`` tokens, BOS first when the tokenizer has one):

   - SNR per decoder layer, local (pruned layer on the dense layer input) and accumulated
     (the pruned model on its own states), against the dense layer output;
   - LAPE activation counts of every FFN neuron (act_fn(gate_proj x) > 0, i.e. gate > 0, for
     gated MLPs; the down projection's input otherwise) of the pruned model;

   and on parallel FLORES sentences (the same first K sentences in every language) the
   LSAR change of the agnostic and specific parts of each layer's pooled output.

The dense side (LSAR pooled states and fitted bases, LAPE counts) is computed once per
model, dtype and evaluation text and cached under ``cache_dir()/analysis/<key>`` as
safetensors + JSON; the per-layer dense states SNR compares against are recomputed once
per process (one forward pass).

SparseGPT also updates the kept weights, which the masks do not record: its runs are
analysed as dense weights x mask (the tag ``langprune.analysis.weights`` says so).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from analysis import iou as I
from analysis import lape as LP
from analysis import lsar as LS
from analysis import plots
from analysis import snr as S
from pipeline.config import Config, ModelCfg, split_list
from pipeline.errors import LangpruneError
from pipeline.masks import PackedMask, apply_masks, load_packed, read_metadata
from tracking import params as P
from tracking import runs as R
from tracking import runs_table as RT

log = logging.getLogger(__name__)

CACHE_FORMAT = "langprune.analysis-dense/1"
# Methods whose pruned weights are not dense x mask (the masks cannot reproduce them).
WEIGHT_UPDATING = frozenset({"sparsegpt"})
# MLP layouts LAPE understands: the module whose output (gated) or input (plain) is the
# neuron activation, and the modules whose rows / columns belong to each neuron.
_GATED = ("gate_proj", ("gate_proj", "up_proj"), ("down_proj",))
_PLAIN = ("dense_4h_to_h", ("dense_h_to_4h",), ("dense_4h_to_h",))


# ---- evaluation text ---------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class AnalysisText:
    """Token ids of the evaluation text every analysis reads.

    Attributes:
        languages: Evaluation languages, in config order.
        windows: Language -> ``[n, seq_len]`` windows (BOS first when the tokenizer has one).
        sentences: Language -> ``[K, T]`` first K sentences, right-padded (causal attention
            never lets a real token see the padding to its right).
        lengths: Language -> ``[K]`` real lengths of those sentences.
    """

    languages: tuple[str, ...]
    windows: Mapping[str, Tensor]
    sentences: Mapping[str, Tensor]
    lengths: Mapping[str, Tensor]

    def digest(self) -> str:
        """sha256 over every token id: identifies tokenizer + text + budget."""
        h = hashlib.sha256()
        for lang in self.languages:
            for t in (self.windows[lang], self.sentences[lang], self.lengths[lang]):
                h.update(lang.encode() + b"\0" + str(tuple(t.shape)).encode())
                h.update(t.to(torch.int64).numpy().tobytes())
        return h.hexdigest()

    def attention_mask(self, lang: str) -> Tensor:
        """``[K, T]`` bool: True on each sentence's real tokens."""
        lengths = self.lengths[lang]
        width = self.sentences[lang].shape[1]
        return torch.arange(width)[None, :] < lengths[:, None]


def _bos(tokenizer: Any) -> int | None:
    bos = getattr(tokenizer, "bos_token_id", None)
    return None if bos is None else int(bos)


def analysis_windows(tokenizer: Any, sentences: Sequence[str], tokens: int, seq_len: int) -> Tensor:
    """``floor(tokens / width)`` (at least one) non-overlapping windows of the joined text.

    ``width`` is ``seq_len - 1`` text tokens after a BOS token, or ``seq_len`` without one
    (:func:`pipeline.data.sampler.text_tokens_per_window`); text is chosen as whole
    sentences by :func:`pipeline.evaluate.perplexity.select_text`.

    Raises:
        LangpruneError: if the text is shorter than one window.
    """
    from pipeline.data.sampler import text_tokens_per_window
    from pipeline.evaluate.perplexity import select_text

    width = text_tokens_per_window(tokenizer, seq_len)
    n = max(1, tokens // width)
    _, ids = select_text(tokenizer, list(sentences), n * width)
    n = min(n, len(ids) // width)
    if n == 0:
        raise LangpruneError(
            f"the evaluation text has {len(ids)} tokens, fewer than one analysis window of "
            f"{width}; lower analysis_seq_len"
        )
    body = torch.tensor(ids[: n * width], dtype=torch.int64).view(n, width)
    bos = _bos(tokenizer)
    if bos is None:
        return body
    return torch.cat([torch.full((n, 1), bos, dtype=torch.int64), body], dim=1)


def _sentence_batch(
    tokenizer: Any, sentences: Sequence[str], max_len: int
) -> tuple[Tensor, Tensor]:
    """Sentences tokenized one by one (BOS first if any), cut to ``max_len``, right-padded."""
    bos = _bos(tokenizer)
    encoded = tokenizer(list(sentences), add_special_tokens=False)["input_ids"]
    rows = [([bos] if bos is not None else []) + list(ids) for ids in encoded]
    rows = [r[:max_len] for r in rows if r]
    if not rows:
        raise LangpruneError("the LSAR sentences tokenize to nothing")
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = 0 if pad is None else int(pad)
    width = max(len(r) for r in rows)
    batch = torch.full((len(rows), width), pad, dtype=torch.int64)
    for k, r in enumerate(rows):
        batch[k, : len(r)] = torch.tensor(r, dtype=torch.int64)
    return batch, torch.tensor([len(r) for r in rows], dtype=torch.int64)


def build_text(
    tokenizer: Any, source: str, languages: Sequence[str], tokens: int, seq_len: int
) -> AnalysisText:
    """Windows and parallel sentences of every evaluation language.

    The LSAR sentences are the first K sentences of the (parallel) corpus in every
    language, K = the smallest number of whole sentences that reaches ``tokens`` in some
    language, so every language gets the same sentences and no more than its budget.
    """
    from pipeline.data.sources import load_eval_sentences
    from pipeline.evaluate.perplexity import select_text

    texts = {lang: load_eval_sentences(source, lang) for lang in languages}
    windows = {lang: analysis_windows(tokenizer, texts[lang], tokens, seq_len)
               for lang in languages}
    k = min(select_text(tokenizer, texts[lang], tokens)[0] for lang in languages)
    k = min(max(k, 1), min(len(t) for t in texts.values()))
    sentences, lengths = {}, {}
    for lang in languages:
        sentences[lang], lengths[lang] = _sentence_batch(tokenizer, texts[lang][:k], seq_len)
    return AnalysisText(tuple(languages), windows, sentences, lengths)


# ---- hooks on FFN neurons --------------------------------------------------------------------


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


def ffn_layout(layer: nn.Module) -> tuple[FfnLayout, int]:
    """The FFN layout of a decoder layer and its number of neurons.

    Raises:
        LangpruneError: for an MLP that is neither gated (gate_proj) nor GPT-NeoX style.
    """
    from pipeline.models import find_linears

    kinds = {name.rsplit(".", 1)[-1]: mod for name, mod in find_linears(layer).items()}
    for layout, gated in ((_GATED, True), (_PLAIN, False)):
        probe, rows, cols = layout
        if probe in kinds and all(r in kinds for r in (*rows, *cols)):
            mod = kinds[probe]
            n = mod.out_features if gated else mod.in_features
            return FfnLayout(probe, gated, rows, cols), int(n)
    raise LangpruneError(
        f"LAPE cannot find the FFN neurons of {type(layer).__name__}: expected gate_proj/"
        f"up_proj/down_proj or dense_h_to_4h/dense_4h_to_h, found {sorted(kinds)}"
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
    def hooked(self, layers: Sequence[nn.Module]) -> Iterator[None]:
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


# ---- layer-wise passes -----------------------------------------------------------------------


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
        from pipeline.models import decoder_layers

        return decoder_layers(self.model)

    def walk(self, ids: Tensor) -> Iterator[Any]:
        from pipeline.engine import layerwise_forward

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


# ---- dense reference (cached) ----------------------------------------------------------------


@dataclass(eq=False)
class DenseReference:
    """What every run is compared with, computed once per model and text.

    Attributes:
        key: Cache key (model, dtype, pooling, token ids of the text).
        languages: Evaluation languages.
        lsar_states: Per layer, language -> pooled dense states ``[K, d]`` (float32).
        bases: Per layer, the LSAR subspace fitted on the dense states (empty for < 2
            languages: LSAR needs at least two).
        lape: Dense FFN activation counts.
    """

    key: str
    languages: tuple[str, ...]
    lsar_states: list[dict[str, Tensor]]
    bases: list[LS.LsarBasis]
    lape: LP.ActivationCounter


def dense_cache_key(
    source: str, n_params: int, dtype: str, pooling: str, text: AnalysisText
) -> str:
    """Key of the dense cache: the model's identity, dtype, pooling and the exact token ids."""
    blob = json.dumps(
        {"format": CACHE_FORMAT, "model": source, "n_params": n_params, "dtype": dtype,
         "pooling": pooling, "text": text.digest()},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def fit_bases(states: Sequence[Mapping[str, Tensor]]) -> list[LS.LsarBasis]:
    """One LSAR basis per layer from the dense pooled states (rank L - 1)."""
    bases = []
    for by_lang in states:
        means, langs = LS.language_means(by_lang)
        bases.append(LS.fit_lsar(means, languages=langs))
    return bases


def compute_dense_reference(
    engine: Engine, text: AnalysisText, pooling: str, key: str,
) -> tuple[DenseReference, dict[str, list[list[Tensor]]]]:
    """Dense LAPE counts, LSAR states and bases, and the dense states SNR compares against."""
    langs = text.languages
    counter = LP.ActivationCounter(langs, len(engine.layers), engine.n_neurons)
    hooks = NeuronCounter(counter, engine.layout)
    states = {}
    with hooks.hooked(engine.layers):
        for lang in tqdm(langs, desc="dense states", disable=not engine.progress, leave=False):
            with hooks.counting(lang):
                states[lang] = dense_window_states(engine, text.windows[lang])
    pooled = {lang: pooled_states(engine, text, lang, pooling) for lang in langs}
    per_layer = [{lang: pooled[lang][i] for lang in langs} for i in range(len(engine.layers))]
    bases = fit_bases(per_layer) if len(langs) >= 2 else []
    return DenseReference(key, langs, per_layer, bases, counter), states


def save_dense_reference(ref: DenseReference, folder: Path) -> None:
    """Write the reference as safetensors + JSON, atomically (temp folder, then rename)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        langs = json.dumps(list(ref.languages))
        states = {f"{i}.{lang}": t.contiguous() for i, by in enumerate(ref.lsar_states)
                  for lang, t in by.items()}
        save_file(states, tmp / "lsar_states.safetensors", metadata={"languages": langs})
        bases = {f"{i}.{k}": v.contiguous() for i, b in enumerate(ref.bases)
                 for k, v in b.state_dict().items()}
        save_file(bases, tmp / "lsar_bases.safetensors", metadata={"languages": langs})
        save_file({"over_zero": ref.lape.over_zero, "tokens": ref.lape.tokens},
                  tmp / "lape_counts.safetensors", metadata={"languages": langs})
        meta = {"format": CACHE_FORMAT, "key": ref.key, "languages": list(ref.languages),
                "layers": len(ref.lsar_states), "bases": len(ref.bases)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process cached the same key first: keep theirs
            log.info("dense analysis cache %s already exists", folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_dense_reference(folder: Path) -> DenseReference | None:
    """The cached reference in ``folder``, or None when there is none (or another format)."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != CACHE_FORMAT:
        return None
    langs = tuple(meta["languages"])
    states = load_file(str(folder / "lsar_states.safetensors"))
    per_layer = [{lang: states[f"{i}.{lang}"] for lang in langs} for i in range(meta["layers"])]
    raw = load_file(str(folder / "lsar_bases.safetensors"))
    bases = [LS.LsarBasis.from_state_dict({k: raw[f"{i}.{k}"] for k in
                                           ("basis", "shared", "centroid", "singular_values")},
                                          languages=sorted(langs))
             for i in range(meta["bases"])]
    counts = load_file(str(folder / "lape_counts.safetensors"))
    _, n_layers, n_neurons = counts["over_zero"].shape
    counter = LP.ActivationCounter(langs, n_layers, n_neurons)
    counter.over_zero, counter.tokens = counts["over_zero"], counts["tokens"]
    return DenseReference(meta["key"], langs, per_layer, bases, counter)


# ---- analysis context ------------------------------------------------------------------------


@dataclass(eq=False)
class Context:
    """Everything shared by the analyses of one sweep's runs.

    Attributes:
        cfg: The analyze config (budgets, LAPE and LSAR options).
        engine: The dense model and how passes run.
        snapshot: Dense decoder-layer weights, restored after each run.
        text: Evaluation text token ids.
        dense: The (cached) dense reference.
        dense_states: Language -> dense states at each layer boundary (for SNR).
        dense_selection: Language-specific neurons of the dense model.
        cache_folder: Where the dense reference is cached.
    """

    cfg: Config
    engine: Engine
    snapshot: Any
    text: AnalysisText
    dense: DenseReference
    dense_states: dict[str, list[list[Tensor]]]
    dense_selection: dict[str, set[LP.Neuron]]
    cache_folder: Path
    timings: dict[str, float] = field(default_factory=dict)


def analysis_model_cfg(cfg: Config, sweep_params: Mapping[str, str]) -> ModelCfg:
    """The sweep's model (what was pruned) with this job's device, dtype and offload."""
    return ModelCfg(
        model=sweep_params.get("model", cfg.model.model),
        device=cfg.model.device,
        dtype=cfg.model.dtype,
        offload=cfg.model.offload,
        trust_remote_code=sweep_params.get("trust_remote_code", "false") == "true",
        model_cache=cfg.model.model_cache,
    )


def build_context(cfg: Config, sweep: RT.Sweep, *, progress: bool = True) -> Context:
    """Load the model once, prepare the text and the dense reference (from cache if there)."""
    from pipeline.models import DenseSnapshot
    from pipeline.loading import load_model
    from pipeline.paths import cache_dir

    t0 = time.perf_counter()
    a = cfg.analysis
    langs = split_list(sweep.params.get("eval_langs", cfg.eval.eval_langs))
    source = sweep.params.get("eval_source", cfg.eval.eval_source)
    loaded = load_model(analysis_model_cfg(cfg, sweep.params))
    text = build_text(loaded.tokenizer, source, langs, a.analysis_tokens, a.analysis_seq_len)
    from pipeline.models import decoder_layers

    layout, n_neurons = ffn_layout(decoder_layers(loaded.model)[0])
    engine = Engine(loaded.model, loaded.device, cfg.prune.capture_batch_size, cfg.model.offload,
                    layout, n_neurons, progress)
    key = dense_cache_key(loaded.source, loaded.n_params, cfg.model.dtype, a.lsar_pooling, text)
    folder = cache_dir(cfg.model.model_cache) / "analysis" / key
    timings = {"load_s": time.perf_counter() - t0}
    t1 = time.perf_counter()
    dense = load_dense_reference(folder)
    if dense is None:
        log.info("computing the dense analysis reference (cached at %s)", folder)
        dense, states = compute_dense_reference(engine, text, a.lsar_pooling, key)
        save_dense_reference(dense, folder)
    else:
        log.info("dense analysis reference from cache %s", folder)
        states = {lang: dense_window_states(engine, text.windows[lang]) for lang in langs}
    timings["dense_s"] = time.perf_counter() - t1
    selection = LP.select_language_specific(dense.lape.probabilities(), list(langs),
                                            a.lape_top_rate, a.lape_filter_quantile)
    return Context(cfg, engine, DenseSnapshot(loaded.model), text, dense, states, selection,
                   folder, timings)


# ---- one run ---------------------------------------------------------------------------------


class _Unpacked(Mapping[str, Tensor]):
    """Packed masks unpacked on access, one module at a time."""

    def __init__(self, packed: Mapping[str, PackedMask]) -> None:
        self._packed = packed

    def __getitem__(self, name: str) -> Tensor:
        return self._packed[name].unpack()

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)


@dataclass(eq=False)
class Measurements:
    """Raw per-run results before they are turned into tables."""

    snr_local: dict[str, list[S.SnrAccumulator]]
    snr_acc: dict[str, list[S.SnrAccumulator]]
    lape: LP.ActivationCounter
    pooled: dict[str, list[Tensor]]


def measure(ctx: Context) -> Measurements:
    """SNR, LAPE counts and LSAR pooled states of the model as it is now (masked)."""
    eng, text = ctx.engine, ctx.text
    counter = LP.ActivationCounter(text.languages, len(eng.layers), eng.n_neurons)
    hooks = NeuronCounter(counter, eng.layout)
    local, acc = {}, {}
    with hooks.hooked(eng.layers):
        for lang in text.languages:
            local[lang], acc[lang] = snr_pass(eng, text.windows[lang], ctx.dense_states[lang],
                                              hooks, lang)
    pooled = {}
    if ctx.dense.bases:
        pooled = {lang: pooled_states(eng, text, lang, ctx.cfg.analysis.lsar_pooling)
                  for lang in text.languages}
    return Measurements(local, acc, counter, pooled)


def lsar_frame(ctx: Context, pooled: Mapping[str, Sequence[Tensor]]) -> pd.DataFrame:
    """Per evaluation language x layer, the mean change of the agnostic and specific parts."""
    rows = []
    for lang in ctx.text.languages:
        if lang not in pooled:
            continue
        for layer, basis in enumerate(ctx.dense.bases):
            change = LS.lsar_change(ctx.dense.lsar_states[layer][lang], pooled[lang][layer], basis)
            rows.append([lang, layer, change.agnostic, change.specific])
    return pd.DataFrame(rows, columns=["eval_lang", "layer", "agnostic", "specific"])


def lape_frame(
    ctx: Context, counter: LP.ActivationCounter, masks: Mapping[str, PackedMask],
) -> tuple[pd.DataFrame, float, Tensor]:
    """Dense vs pruned language-specific neurons, and how much of them the mask removed.

    Returns:
        ``(table, removed_all, pruned LAPE scores)``: one row per language with
        ``n_dense``, ``n_pruned``, ``n_both``, ``jaccard`` and ``removed_fraction`` (of the
        dense language-specific neurons' weights); ``removed_all`` is that fraction over
        every FFN neuron (the reference).
    """
    a, lay = ctx.cfg.analysis, ctx.engine.layout
    p = counter.probabilities()
    pruned_sel = LP.select_language_specific(p, list(ctx.text.languages), a.lape_top_rate,
                                             a.lape_filter_quantile)
    table = LP.selection_overlap(ctx.dense_selection, pruned_sel).rename(
        columns={"n_a": "n_dense", "n_b": "n_pruned"})
    unpacked = _Unpacked(masks)
    removed = LP.removed_fraction(ctx.dense_selection, unpacked, lay.rows, lay.cols)
    table["removed_fraction"] = [removed.get(lang, math.nan) for lang in table["lang"]]
    everyone = {(layer, j) for layer in range(p.shape[1]) for j in range(p.shape[2])}
    removed_all = LP.removed_fraction({"all": everyone}, unpacked, lay.rows, lay.cols)["all"]
    return table, removed_all, LP.lape_scores(p)


def _mean_db(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def headline_metrics(
    snr: pd.DataFrame, lsar: pd.DataFrame, lape: pd.DataFrame, removed_all: float
) -> dict[str, float]:
    """Headline numbers of one run (see the README's analysis metrics)."""
    m: dict[str, float] = {}
    pooled = S.mean_snr_by_layer(snr)
    for kind, name in (("local", "snr_local"), ("accumulated", "snr_acc")):
        rows = pooled[pooled["kind"] == kind].sort_values("layer")
        m[f"{name}.mean"] = _mean_db(rows["snr_db"].tolist())
        m[f"{name}.final"] = float(rows["snr_db"].iloc[-1])
        for lang, group in snr[snr["kind"] == kind].groupby("eval_lang", sort=True):
            m[f"{name}.final.{lang}"] = float(group.sort_values("layer")["snr_db"].iloc[-1])
    for part in ("agnostic", "specific"):
        for lang, group in lsar.groupby("eval_lang", sort=True):
            m[f"lsar.{part}.{lang}"] = float(group[part].mean())
        if len(lsar):
            m[f"lsar.{part}.mean"] = float(lsar[part].mean())
    for row in lape.itertuples():
        m[f"lape.overlap.{row.lang}"] = float(row.jaccard)
        m[f"lape.removed.{row.lang}"] = float(row.removed_fraction)
    m["lape.removed.all"] = removed_all
    return m


def analyze_member(ctx: Context, member: RT.Member, masks_path: Path) -> dict[str, float]:
    """Apply one run's masks to the dense model, measure, restore, and log it all to the run."""
    t0 = time.perf_counter()
    packed = load_packed(masks_path)
    ctx.snapshot.restore()
    try:
        apply_masks(ctx.engine.model, packed)
        raw = measure(ctx)
    finally:
        ctx.snapshot.restore()
    snr = S.snr_table(raw.snr_local, raw.snr_acc)
    lsar = lsar_frame(ctx, raw.pooled)
    lape, removed_all, pruned_scores = lape_frame(ctx, raw.lape, packed)
    metrics = headline_metrics(snr, lsar, lape, removed_all)
    metrics["time.analysis_s"] = time.perf_counter() - t0
    log_member(ctx, member, snr, lsar, lape, raw.lape, pruned_scores, metrics)
    return metrics


def log_member(
    ctx: Context, member: RT.Member, snr: pd.DataFrame, lsar: pd.DataFrame, lape: pd.DataFrame,
    counts: LP.ActivationCounter, pruned_scores: Tensor, metrics: Mapping[str, float],
) -> None:
    """Step metrics, headline metrics, tables, LAPE counts and histogram; tag done last."""
    run = R.TrackedRun(member.run_id)
    for (kind, lang), group in snr.groupby(["kind", "eval_lang"], sort=True):
        name = "snr_local" if kind == "local" else "snr_acc"
        values = {int(r.layer): float(r.snr_db) for r in group.itertuples()
                  if not math.isnan(r.snr_db)}
        run.log_step_metrics(f"{name}.{lang}", values)
    run.log_metrics(metrics)
    run.log_table(snr, RT.SNR_TABLE)
    if len(lsar):
        run.log_table(lsar, RT.LSAR_TABLE)
    run.log_table(lape, RT.LAPE_TABLE)
    weights = "dense_x_mask" if member.method in WEIGHT_UPDATING else "exact"
    with tempfile.TemporaryDirectory() as tmp:
        counts_path = Path(tmp) / Path(RT.LAPE_COUNTS).name
        save_file({"over_zero": counts.over_zero, "tokens": counts.tokens}, counts_path,
                  metadata={"languages": json.dumps(list(counts.languages))})
        run.log_artifact(counts_path, "analysis")
        hist = plots.lape_histograms(
            LP.lape_scores(ctx.dense.lape.probabilities()).numpy(),
            {f"{member.method} {member.calib_lang}": pruned_scores.numpy()},
            Path(tmp) / "lape_hist.png",
            title=f"LAPE: dense vs {member.method} {member.calib_lang}")
        run.log_artifact(hist, "analysis")
    run.log_json(analysis_summary(ctx, member, weights, metrics), RT.ANALYSIS_SUMMARY)
    run.set_tags({"langprune.analysis.weights": weights,
                  "langprune.analysis.dense_cache": ctx.dense.key, RT.TAG_ANALYSIS: "done"})


def analysis_summary(
    ctx: Context, member: RT.Member, weights: str, metrics: Mapping[str, float]
) -> dict[str, Any]:
    """What was computed how: budgets, text sizes, cache key, weights mode, headline metrics."""
    a, text = ctx.cfg.analysis, ctx.text
    return {
        "run_id": member.run_id,
        "method": member.method,
        "calib_lang": member.calib_lang,
        "calib_set": member.calib_set,
        "weights": weights,
        "analysis_tokens": a.analysis_tokens,
        "analysis_seq_len": a.analysis_seq_len,
        "lsar_pooling": a.lsar_pooling,
        "lape_top_rate": a.lape_top_rate,
        "lape_filter_quantile": a.lape_filter_quantile,
        "languages": list(text.languages),
        "windows_per_language": {k: list(v.shape) for k, v in text.windows.items()},
        "lsar_sentences": int(next(iter(text.sentences.values())).shape[0]),
        "dense_cache": ctx.dense.key,
        "metrics": {k: metrics[k] for k in sorted(metrics)},
    }


# ---- IoU -------------------------------------------------------------------------------------


class LazyPackedMasks(Mapping[str, PackedMask]):
    """A run's packed masks read one module at a time.

    The file's format and checksum are not verified again here: :func:`check_mask_files`
    verifies every member's file before the analyses start.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = str(path)
        shapes = json.loads(read_metadata(path)["shapes"])
        self._shapes = {name: tuple(shape) for name, shape in shapes.items()}

    def __getitem__(self, name: str) -> PackedMask:
        if name not in self._shapes:
            raise KeyError(name)
        with safe_open(self._path, framework="np") as f:
            return PackedMask(f.get_tensor(name), self._shapes[name])

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._shapes))

    def __len__(self) -> int:
        return len(self._shapes)


_PAIR_KEYS = ["method", "run_a", "run_b", "lang_a", "lang_b", "set_a", "set_b"]


def pair_tables(
    pairs: pd.DataFrame, masks: Mapping[str, Mapping[str, PackedMask]], progress: bool
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Per pair: per-module, per-layer and per-module-type IoU tables, concatenated."""
    modules, layers, types = [], [], []
    rows = pairs[_PAIR_KEYS].to_dict("records")
    for pair in tqdm(rows, desc="iou tables", disable=not progress, leave=False):
        table = I.iou_table(masks[pair["run_a"]], masks[pair["run_b"]])
        for frame, out in ((table, modules), (I.aggregate_iou(table, "layer"), layers),
                           (I.aggregate_iou(table, "module_type"), types)):
            out.append(frame.assign(**pair)[_PAIR_KEYS + [c for c in frame.columns]])
    return pd.concat(modules, ignore_index=True), pd.concat(layers, ignore_index=True), \
        pd.concat(types, ignore_index=True)


def intra_inter_by_layer(layers: pd.DataFrame) -> pd.DataFrame:
    """Mean IoU per method, kind (intra / inter) and layer over the pairs of that kind."""
    same = layers["lang_a"] == layers["lang_b"]
    kind = np.where(same, "intra", "inter")
    keep = ~same | (layers["set_a"] != layers["set_b"])
    frame = layers.assign(kind=kind)[keep]
    out = frame.groupby(["method", "kind", "layer"], sort=True)["iou"].mean().reset_index()
    return out[["method", "kind", "layer", "iou"]]


def method_sparsity(members: Sequence[RT.Member]) -> dict[str, float]:
    """The (single) target sparsity of each method's runs."""
    out: dict[str, float] = {}
    for m in members:
        s = float(m.params.get("sparsity", "nan"))
        if out.setdefault(m.method, s) != s:
            raise LangpruneError(f"{m.method} runs of the sweep differ in sparsity; IoU needs one")
    return out


def analyze_iou(
    parent: R.TrackedRun, members: Sequence[RT.Member], mask_paths: Mapping[str, Path],
    *, progress: bool = False,
) -> dict[str, float]:
    """Pairwise mask IoU of same-method members, logged to the sweep parent (``iou/``).

    ``mask_paths`` must have passed :func:`check_mask_files` (format and checksum).
    """
    refs = [I.RunRef(m.run_id, m.calib_lang, m.calib_set, m.method) for m in members]
    masks = {m.run_id: LazyPackedMasks(mask_paths[m.run_id]) for m in members}
    pairs = I.pairwise_iou(refs, masks.__getitem__, progress=progress)
    if pairs.empty:
        log.warning("no two runs share a method: no mask IoU to compute")
        return {}
    modules, layers, types = pair_tables(pairs, masks, progress)
    summary = I.intra_inter_summary(pairs)
    by_layer = intra_inter_by_layer(layers)
    sparsity = method_sparsity(members)
    metrics: dict[str, float] = {}
    for row in summary.itertuples():
        metrics[f"iou.intra.{row.method}"] = row.intra
        metrics[f"iou.inter.{row.method}"] = row.inter
        metrics[f"iou.random_baseline.{row.method}"] = I.random_iou_baseline(sparsity[row.method])
    if len(set(sparsity.values())) == 1:
        metrics["iou.random_baseline"] = I.random_iou_baseline(next(iter(sparsity.values())))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, frame in (("pairs", pairs), ("modules", modules), ("layers", layers),
                            ("module_types", types), ("summary", summary),
                            ("layers_summary", by_layer)):
            frame.to_csv(folder / f"{name}.csv", index=False)
        for method in sorted(set(pairs["method"])):
            _iou_method_files(folder, pairs, by_layer, method, sparsity[method])
        for path in sorted(folder.iterdir()):
            parent.log_artifact(path, RT.IOU_DIR)
    parent.log_metrics(metrics)
    return metrics


def _iou_method_files(
    folder: Path, pairs: pd.DataFrame, by_layer: pd.DataFrame, method: str, sparsity: float
) -> None:
    matrix = I.language_iou_matrix(pairs, method)
    matrix.to_csv(folder / f"matrix_{method}.csv")
    plots.iou_heatmap(matrix, folder / f"heatmap_{method}.png", sparsity=sparsity,
                      title=f"mask IoU, {method}")
    rows = by_layer[by_layer["method"] == method]
    series = {kind: g.sort_values("layer")["iou"].tolist()
              for kind, g in rows.groupby("kind", sort=True)}
    plots.layer_lines(series, folder / f"layers_{method}.png",
                      baseline=I.random_iou_baseline(sparsity), baseline_label="random s/(2-s)",
                      ylabel="IoU", title=f"mask IoU per layer, {method}")


# ---- the job ---------------------------------------------------------------------------------


def _check_members(members: Sequence[RT.Member], sweep: RT.Sweep) -> None:
    """Every run to analyse must be of the sweep's model (before anything heavy)."""
    model = sweep.params.get("model")
    for m in members:
        if m.params.get("model") != model:
            raise LangpruneError(
                f"run {m.run_id} pruned model {m.params.get('model')!r}, the sweep is of {model!r}"
            )


def _wrapper(exp_id: str, parent_id: str) -> R.TrackedRun | None:
    """The run ``mlflow run -e analyze`` created, tagged as an analyze run of the sweep."""
    if not os.environ.get("MLFLOW_RUN_ID"):
        return None
    tags = {P.TAG_KIND: "analyze", P.TAG_STATE: "running", RT.TAG_SWEEP: parent_id}
    return R.attach_or_create(exp_id, f"analyze-{parent_id[:8]}", tags)


def run_analyze(cfg: Config) -> None:
    """IoU across the sweep's members; SNR, LSAR and LAPE for members lacking them.

    Args:
        cfg: ``sweep_run`` (or the newest finished sweep), the analysis budgets, device,
            dtype, offload and ``force`` (re-analyse every member).

    Raises:
        LangpruneError: no sweep, a sweep without members, or members of another model.
    """
    R.check_tracking_reachable()
    exp_id = R.experiment_id(cfg.run.experiment)
    sweep = RT.load_sweep(RT.find_sweep(exp_id, cfg.analysis.sweep_run))
    if not sweep.members:
        raise LangpruneError(f"sweep {sweep.run_id} has no successful member runs")
    todo = [m for m in sweep.members if cfg.run.force or m.tags.get(RT.TAG_ANALYSIS) != "done"]
    _check_members(todo, sweep)
    wrapper = _wrapper(exp_id, sweep.run_id)
    guard = R.run_guard(wrapper) if wrapper is not None else contextlib.nullcontext()
    with guard, tempfile.TemporaryDirectory(prefix="langprune-analyze-") as tmp:
        paths = {m.run_id: RT.download_masks(m.run_id, tmp) for m in sweep.members}
        check_mask_files(cfg, sweep, paths)
        parent = R.TrackedRun(sweep.run_id)
        analyze_iou(parent, sweep.members, paths, progress=True)
        done = _analyze_members(cfg, sweep, parent, todo, paths)
        print(f"analyzed sweep {sweep.run_id}: IoU over {len(sweep.members)} runs; SNR/LSAR/LAPE "
              f"for {len(done)} run(s), {len(sweep.members) - len(done)} already done")
        if wrapper is not None:
            wrapper.log_json({"sweep_run": sweep.run_id, "analyzed": done}, "analyze.json")
            wrapper.finish()


def check_mask_files(cfg: Config, sweep: RT.Sweep, paths: Mapping[str, Path]) -> None:
    """Before the model loads: every member's mask file is intact (format, sha256), is the file
    the run logged (its ``langprune.masks_sha256`` tag), and fits the model (every name a
    module with a weight of the mask's shape, read off the model's meta-device skeleton).

    Raises:
        LangpruneError: one line naming the run and the first problem.
    """
    from pipeline.loading import probe_model

    probe = probe_model(analysis_model_cfg(cfg, sweep.params))
    for member in sweep.members:
        path = paths[member.run_id]
        load_packed(path)  # format and payload checksum
        meta = read_metadata(path)
        logged = member.tags.get("langprune.masks_sha256")
        if logged and meta["sha256"] != logged:
            raise LangpruneError(
                f"mask file of run {member.run_id} has sha256 {meta['sha256'][:12]}..., but the "
                f"run logged {logged[:12]}...: the artifact was replaced"
            )
        if probe is None:  # a model not yet converted: apply_masks checks shapes later
            continue
        for name, shape in json.loads(meta["shapes"]).items():
            want = probe.weight_shapes.get(name)
            if want is None:
                raise LangpruneError(
                    f"mask file of run {member.run_id}: {name!r} names no module with a weight "
                    f"in {probe.folder}"
                )
            if tuple(shape) != want:
                raise LangpruneError(
                    f"mask file of run {member.run_id}: {name!r} has shape {tuple(shape)}, the "
                    f"model's weight has {want}"
                )


def _analyze_members(
    cfg: Config, sweep: RT.Sweep, parent: R.TrackedRun, todo: Sequence[RT.Member],
    paths: Mapping[str, Path],
) -> list[str]:
    if not todo:
        return []
    ctx = build_context(cfg, sweep)
    _log_dense(parent, ctx)
    done = []
    for member in tqdm(todo, desc="analyze runs"):
        metrics = analyze_member(ctx, member, paths[member.run_id])
        log.info("analyzed %s (%s %s set %d) in %.1f s", member.run_id, member.method,
                 member.calib_lang, member.calib_set, metrics["time.analysis_s"])
        done.append(member.run_id)
    return done


def _log_dense(parent: R.TrackedRun, ctx: Context) -> None:
    """The dense LAPE counts (for the report's distributions) and timings, on the parent."""
    counts = ctx.dense.lape
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(RT.DENSE_LAPE_COUNTS).name
        save_file({"over_zero": counts.over_zero, "tokens": counts.tokens}, path,
                  metadata={"languages": json.dumps(list(counts.languages))})
        parent.log_artifact(path, "analysis")
    parent.set_tags({"langprune.analysis.dense_cache": ctx.dense.key})
    parent.log_metrics({f"time.analysis_{k}": v for k, v in ctx.timings.items()})
