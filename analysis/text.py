"""The evaluation text every per-run analysis reads: token windows and parallel sentences.

For each evaluation language: non-overlapping windows of ``analysis_seq_len`` tokens (BOS
first when the tokenizer has one) for SNR and LAPE, and the same first K sentences of the
parallel corpus (right-padded) for LSAR. Text is chosen as whole sentences, as perplexity
chooses it (:func:`pipeline.evaluate.perplexity.select_text`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pipeline.errors import LangpruneError


@dataclass(frozen=True, eq=False)
class AnalysisText:
    """Token ids of the evaluation text every analysis reads.

    Attributes:
        languages: Evaluation languages, in config order.
        windows: Language -> ``[n, seq_len]`` windows (BOS first when the tokenizer has one).
        sentences: Language -> ``[K, T]`` first K sentences, right-padded (causal attention
            never lets a real token see the padding to its right).
        lengths: Language -> ``[K]`` real lengths of those sentences.
        lsar_source: Where the LSAR sentences come from: ``belebele`` (passages) or the
            evaluation source.
    """

    languages: tuple[str, ...]
    windows: Mapping[str, Tensor]
    sentences: Mapping[str, Tensor]
    lengths: Mapping[str, Tensor]
    lsar_source: str = ""

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


def belebele_passages(languages: Sequence[str]) -> dict[str, list[str]] | None:
    """The bundled Belebele passages of every language, aligned (sorted by link), or None
    when some language has no bundled Belebele file."""
    from pipeline.data.documents import bundled_path, read_jsonl

    paths = {lang: bundled_path("belebele", lang) for lang in languages}
    if not all(p.exists() for p in paths.values()):
        return None
    out = {}
    for lang, path in paths.items():
        by_link = {r["link"]: r["flores_passage"] for r in read_jsonl(path)}
        out[lang] = [by_link[link] for link in sorted(by_link)]
    return out


def lsar_texts(
    source: str, texts: Mapping[str, list[str]]
) -> tuple[str, Mapping[str, list[str]]]:
    """The LSAR prompts: Belebele passages, as the LSAR paper's probing uses, when every
    language has them; otherwise the evaluation sentences. The prompts must be parallel
    (the same items in every language), so one source serves all languages: mixing
    Belebele for some and FLORES for others would compare different texts."""
    passages = belebele_passages(list(texts))
    return ("belebele", passages) if passages is not None else (source, texts)


def build_text(
    tokenizer: Any, source: str, languages: Sequence[str], tokens: int, seq_len: int,
    lsar_sentences: int = 0,
) -> AnalysisText:
    """Windows and parallel sentences of every evaluation language.

    The LSAR sentences (:func:`lsar_texts`) are the first K items of the parallel corpus in
    every language: ``lsar_sentences`` when > 0, else K = the smallest number of whole items
    that reaches ``tokens`` in some language, so every language gets the same sentences.
    """
    from pipeline.data.sources import load_eval_sentences
    from pipeline.evaluate.perplexity import select_text

    texts = {lang: load_eval_sentences(source, lang) for lang in languages}
    windows = {lang: analysis_windows(tokenizer, texts[lang], tokens, seq_len)
               for lang in languages}
    name, prompts = lsar_texts(source, texts)
    k = lsar_sentences or min(select_text(tokenizer, prompts[lang], tokens)[0]
                              for lang in languages)
    k = min(max(k, 1), min(len(t) for t in prompts.values()))
    sentences, lengths = {}, {}
    for lang in languages:
        sentences[lang], lengths[lang] = _sentence_batch(tokenizer, prompts[lang][:k], seq_len)
    return AnalysisText(tuple(languages), windows, sentences, lengths, name)

