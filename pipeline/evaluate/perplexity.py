"""Perplexity and bits per byte of one language's evaluation text: one definition.

Definition ``token_nonoverlap_v1`` (docs/science.md#perplexity):

1. **Text.** The evaluation sentences, in order, joined with :data:`SEPARATOR` (a newline).
   With a token budget ``B > 0`` the text is the *shortest prefix of whole sentences* whose
   tokenization has at least ``B`` tokens (all sentences when they have fewer); ``B = 0``
   means all sentences. Whole sentences keep the byte count exact.
2. **Tokens.** The text is tokenized once, without special tokens.
3. **Windows.** The tokens are cut into consecutive, non-overlapping chunks of
   ``seq_len - 1``; each window is a *start token* followed by one chunk, so it is at most
   ``seq_len`` tokens long (the last one may be shorter; nothing is padded or dropped). The
   start token is the tokenizer's BOS, else its EOS (as lm-eval's ``prefix_token_id``): models
   like Gemma need BOS at position 0, and with it *every text token is predicted exactly
   once*, its context being the earlier tokens of its own window.
4. **Metrics.** ``nll_sum`` = sum of next-token negative log-likelihoods (nats) of all text
   tokens; ``ppl = exp(nll_sum / n_tokens)``; ``bpb = nll_sum / ln 2 / n_bytes`` with
   ``n_bytes`` the UTF-8 bytes of exactly the selected text (separators included).

**Per-window records** (:func:`evaluate_perplexity_windows`): one :class:`WindowRecord` per
window, in order, with its NLL sum (nats), predicted tokens and UTF-8 bytes, for bootstrap
intervals over windows. The records' NLLs are the very numbers the total is summed from
(the total stays bit-identical), their tokens sum to ``n_tokens`` and their bytes partition
``n_bytes`` exactly: a window's bytes run from the end of the previous window's last token
to the end of its own (from the tokenizer's character offsets when it is a fast tokenizer,
else from the byte length of the decoded token prefix, which can shift a boundary by the
few bytes a tokenizer normalises); the last window ends at the end of the text.

The 262k-token vocabulary of Gemma makes full logits large (0.5 GB per 512-token window in
float32), so the loss is computed in chunks of positions from the final hidden states
through the output embedding. A short probe checks once per call that this equals the
model's own logits (models that soft-cap or scale logits fail it and fall back to full
logits, one micro-batch at a time).
"""

from __future__ import annotations

import itertools
import logging
import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pipeline.errors import LangpruneError
from pipeline.models import input_embeddings, output_embeddings, weight_of

log = logging.getLogger(__name__)

DEFINITION = "token_nonoverlap_v1"
SEPARATOR = "\n"
# Upper bound on the float32 logits held at once while computing the loss.
_LOGIT_CHUNK_BYTES = 1 << 28
_PROBE_TOKENS = 16


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of one text under :data:`DEFINITION`.

    Attributes:
        ppl: exp(mean next-token NLL over all predicted tokens).
        bpb: Total NLL in bits divided by the UTF-8 bytes of the text.
        nll_sum: Total NLL in nats.
        n_tokens: Predicted (text) tokens.
        n_windows: Windows evaluated.
        n_bytes: UTF-8 bytes of the selected text.
        n_sentences: Whole sentences selected by the token budget.
        definition: The definition's name, for logging.
    """

    ppl: float
    bpb: float
    nll_sum: float
    n_tokens: int
    n_windows: int
    n_bytes: int
    n_sentences: int
    definition: str = DEFINITION


@dataclass(frozen=True)
class WindowRecord:
    """One evaluation window of :func:`evaluate_perplexity_windows`.

    Attributes:
        window: Index of the window in the text (0-based, in order).
        nll_sum: Sum of its next-token NLLs (nats).
        n_tokens: Its predicted (text) tokens (the start token is not predicted).
        n_bytes: UTF-8 bytes of the text its tokens cover (see the module docstring).
    """

    window: int
    nll_sum: float
    n_tokens: int
    n_bytes: int


def start_token_id(tokenizer: Any) -> int:
    """The token that opens every window: BOS, else EOS."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise LangpruneError(
        f"tokenizer {type(tokenizer).__name__} has neither a BOS nor an EOS token; "
        "perplexity needs a start token for its windows"
    )


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def select_text(tokenizer: Any, sentences: list[str], token_budget: int) -> tuple[int, list[int]]:
    """Choose the shortest prefix of whole sentences with at least ``token_budget`` tokens.

    Token counts are assumed to grow with the number of sentences (true for every
    tokenizer we know), which allows a doubling-then-bisection search: O(log n) tokenizer
    calls instead of one per sentence.

    Returns:
        ``(k, token_ids)``: the number of sentences and the tokens of their joined text.
    """
    n = len(sentences)
    if token_budget <= 0:
        return n, _encode(tokenizer, SEPARATOR.join(sentences))
    cache: dict[int, list[int]] = {}

    def tokens(k: int) -> list[int]:
        if k not in cache:
            cache[k] = _encode(tokenizer, SEPARATOR.join(sentences[:k]))
        return cache[k]

    hi = 1
    while hi < n and len(tokens(hi)) < token_budget:
        hi = min(2 * hi, n)
    if len(tokens(hi)) < token_budget:
        return n, tokens(n)  # hi == n: the whole text is shorter than the budget
    lo = hi // 2  # invariant: tokens(lo) < budget <= tokens(hi) (lo = 0 is the empty text)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(tokens(mid)) >= token_budget:
            hi = mid
        else:
            lo = mid
    return hi, tokens(hi)


def cut_windows(token_ids: list[int], seq_len: int, start_id: int) -> list[list[int]]:
    """Non-overlapping windows ``[start_id] + chunk``, chunks of ``seq_len - 1`` tokens."""
    step = seq_len - 1
    return [[start_id, *token_ids[i : i + step]] for i in range(0, len(token_ids), step)]


def evaluate_perplexity(
    model: nn.Module,
    tokenizer: Any,
    sentences: list[str],
    *,
    seq_len: int,
    token_budget: int = 0,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "perplexity",
) -> PerplexityResult:
    """Perplexity and bits per byte of ``sentences`` under :data:`DEFINITION`.

    Args:
        model: A Hugging Face causal LM (any family); put in eval mode.
        tokenizer: Its tokenizer.
        sentences: Evaluation sentences in order (e.g. FLORES-200 devtest of one language).
        seq_len: Window length in tokens, start token included (``eval_seq_len``).
        token_budget: Minimum number of text tokens (whole sentences); 0 = all text.
        batch_size: Windows per forward pass.
        device: Where the inputs go; default: the device of the input embeddings.
        progress: Show a tqdm progress bar.
        desc: Progress bar label (e.g. the language).

    Returns:
        The :class:`PerplexityResult`.

    Raises:
        LangpruneError: on empty text or bad sizes, before any forward pass.
    """
    return _evaluate(model, tokenizer, sentences, seq_len=seq_len, token_budget=token_budget,
                     batch_size=batch_size, device=device, progress=progress, desc=desc,
                     windows=False)[0]


def evaluate_perplexity_windows(
    model: nn.Module,
    tokenizer: Any,
    sentences: list[str],
    *,
    seq_len: int,
    token_budget: int = 0,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "perplexity",
) -> tuple[PerplexityResult, list[WindowRecord]]:
    """:func:`evaluate_perplexity` (same arguments, same result) plus per-window records.

    The tokenizer must be a fast tokenizer or have ``decode`` (for the window byte counts).

    Returns:
        The :class:`PerplexityResult` and one :class:`WindowRecord` per window, in order.
    """
    return _evaluate(model, tokenizer, sentences, seq_len=seq_len, token_budget=token_budget,
                     batch_size=batch_size, device=device, progress=progress, desc=desc,
                     windows=True)


def _evaluate(model: nn.Module, tokenizer: Any, sentences: list[str], *, seq_len: int,
              token_budget: int, batch_size: int, device: torch.device | str | None,
              progress: bool, desc: str, windows: bool
              ) -> tuple[PerplexityResult, list[WindowRecord]]:
    if seq_len < 2:
        raise LangpruneError(f"eval_seq_len must be >= 2, got {seq_len}")
    if batch_size < 1:
        raise LangpruneError(f"eval_batch_size must be >= 1, got {batch_size}")
    start_id = start_token_id(tokenizer)
    k, ids = select_text(tokenizer, list(sentences), token_budget)
    if not ids:
        raise LangpruneError("no evaluation text: the sentences are empty")
    text_bytes = len(SEPARATOR.join(sentences[:k]).encode("utf-8"))
    cut = cut_windows(ids, seq_len, start_id)
    if device is None:
        device = weight_of(input_embeddings(model)).device
    model.eval()
    nll_sum, nlls = _total_nll(model, cut, batch_size, torch.device(device), progress, desc)
    n_tokens = len(ids)
    records = []
    if windows:
        text = SEPARATOR.join(sentences[:k])
        ends = window_byte_ends(tokenizer, text, ids, [len(w) - 1 for w in cut])
        starts = [0, *ends[:-1]]
        records = [WindowRecord(i, nll, len(w) - 1, end - start)
                   for i, (nll, w, start, end) in enumerate(zip(nlls, cut, starts, ends,
                                                                strict=True))]
    return PerplexityResult(
        ppl=math.exp(nll_sum / n_tokens),
        bpb=nll_sum / math.log(2) / text_bytes,
        nll_sum=nll_sum,
        n_tokens=n_tokens,
        n_windows=len(cut),
        n_bytes=text_bytes,
        n_sentences=k,
    ), records


def window_byte_ends(tokenizer: Any, text: str, ids: list[int], sizes: list[int]) -> list[int]:
    """UTF-8 byte offset in ``text`` where each window's tokens end (the last: ``len(text)``).

    Args:
        tokenizer: The tokenizer that produced ``ids`` from ``text``.
        text: The selected text.
        ids: Its tokens (without special tokens).
        sizes: Text tokens per window, in order (summing to ``len(ids)``).
    """
    n_bytes = len(text.encode("utf-8"))
    cuts = list(itertools.accumulate(sizes))[:-1]  # token counts at the inner boundaries
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, add_special_tokens=False,
                            return_offsets_mapping=True)["offset_mapping"]
        raw = [len(text[: offsets[c - 1][1]].encode("utf-8")) for c in cuts]
    else:
        raw = [len(tokenizer.decode(ids[:c]).encode("utf-8")) for c in cuts]
    ends, last = [], 0
    for b in raw:  # monotone and inside the text, whatever the tokenizer normalised
        last = min(max(b, last), n_bytes)
        ends.append(last)
    return [*ends, n_bytes]




def _batches(windows: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    """Equal-length batches (only the last window can be shorter), so nothing is padded."""
    full = [w for w in windows if len(w) == len(windows[0])]
    rest = windows[len(full):]
    out = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
    return out + [[w] for w in rest]


@torch.inference_mode()
def _total_nll(model: nn.Module, windows: list[list[int]], batch_size: int,
               device: torch.device, progress: bool, desc: str) -> tuple[float, list[float]]:
    """Sum of next-token NLLs (nats, float64) over every window, and each window's sum."""
    chunked = _head_matches_cached(model, windows[0][:_PROBE_TOKENS], device)
    if not chunked:
        log.warning("%s: the model post-processes its logits; computing full logits instead "
                    "of chunks from the hidden states (more memory)", type(model).__name__)
    total = 0.0
    per_window: list[float] = []
    for batch in tqdm(_batches(windows, batch_size), desc=desc, unit="batch", disable=not progress):
        ids = torch.tensor(batch, device=device)
        sums = window_nll(model, ids, chunked=chunked)
        total += float(sums.sum())  # summed per batch as before: the total stays bit-identical
        per_window.extend(sums.tolist())
    return total, per_window


@torch.inference_mode()
def window_nll(model: nn.Module, input_ids: torch.Tensor, chunked: bool = True) -> torch.Tensor:
    """Per-window sum of next-token NLLs (nats, float64) of ``input_ids`` ``[B, L]``.

    Position ``t`` predicts token ``t + 1``; the first token is context only.
    """
    head = output_embeddings(model)
    if chunked:  # project chunks of hidden states: the full logits never exist at once
        states = final_hidden(model, input_ids)
        project: nn.Module = head
    else:
        states = model(input_ids=input_ids, use_cache=False).logits
        project = nn.Identity()
    step = max(1, _LOGIT_CHUNK_BYTES // (4 * weight_of(head).shape[0]))
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float64, device=input_ids.device)
    for row in range(input_ids.shape[0]):  # row slices are contiguous: no copy of logits
        for a in range(0, input_ids.shape[1] - 1, step):
            b = min(a + step, input_ids.shape[1] - 1)
            logits = project(states[row, a:b]).float()
            nll = F.cross_entropy(logits, input_ids[row, a + 1 : b + 1], reduction="sum")
            sums[row] += nll.double()
    return sums


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the final hidden states are known."""


def final_hidden(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The input of the output embedding (final normed hidden states), ``[B, L, H]``.

    Generic across families: a pre-hook on ``get_output_embeddings()`` records its input
    and stops the forward pass before the (large) vocabulary projection.
    """
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
        captured.append(args[0])
        raise _StopForward

    handle = output_embeddings(model).register_forward_pre_hook(hook)
    try:
        model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{type(model).__name__} never called its output embedding")
    return captured[0]


def _head_matches_cached(model: nn.Module, probe_ids: list[int], device: torch.device) -> bool:
    """:func:`head_matches_forward`, probed once per model and output embedding.

    The answer depends on the architecture (logit soft-capping, scales), not on the decoder
    weights that pruning changes, so it is kept per model (weakly, never on the model object)
    instead of being probed for every language: a probe reads the output embedding twice
    (2 x 671 MB for Gemma 3's 262k vocabulary, ~0.6 s on one CPU thread). A replaced or
    re-tied head is probed again.
    """
    head = output_embeddings(model)
    key = (id(head), weight_of(head).data_ptr())
    cached = _HEAD_MATCHES.get(model)
    if cached is not None and cached[0] == key:
        return bool(cached[1])
    result = head_matches_forward(model, torch.tensor([probe_ids], device=device))
    _HEAD_MATCHES[model] = (key, result)
    return result


_HEAD_MATCHES: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, int], bool]] = (
    weakref.WeakKeyDictionary())


@torch.inference_mode()
def head_matches_forward(model: nn.Module, input_ids: torch.Tensor) -> bool:
    """True when ``output_embedding(final_hidden)`` equals the model's own logits.

    False for models that transform logits after the projection (Gemma 2 soft-capping,
    Cohere's logit scale); those need full logits.
    """
    own = model(input_ids=input_ids, use_cache=False).logits.float()
    ours = output_embeddings(model)(final_hidden(model, input_ids)).float()
    if own.shape != ours.shape:
        return False
    # Same weights and inputs: differences come only from matmul blocking, i.e. rounding.
    half = weight_of(output_embeddings(model)).dtype in (torch.float16, torch.bfloat16)
    tol = (2e-2 if half else 1e-4) * (1.0 + float(own.abs().max()))
    return float((own - ours).abs().max()) <= tol
