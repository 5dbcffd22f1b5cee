"""The dense reference every pruned run is compared with, cached on disk.

Computed once per model, dtype, pooling and evaluation text (the key hashes the exact token
ids) and stored under a folder as safetensors + JSON: the LSAR pooled states and fitted
bases per layer and the dense LAPE counts. The dense states SNR compares against are not
cached (one forward pass recomputes them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from analysis import lape as LP
from analysis import lsar as LS
from analysis.neurons import NeuronCounter
from analysis.passes import Engine, dense_window_states, pooled_states
from analysis.text import AnalysisText

log = logging.getLogger(__name__)

CACHE_FORMAT = "langprune.analysis-dense/1"


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
    counter = LP.ActivationCounter(langs, len(engine.layers), engine.n_neurons, per_window=True)
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
        LP.save_counts(ref.lape, tmp / "lape_counts.safetensors")
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
    counter = LP.load_counts(folder / "lape_counts.safetensors", langs)
    return DenseReference(meta["key"], langs, per_layer, bases, counter)
