"""Multiple-choice log-likelihoods with shared prefixes computed once (pure torch, no lm_eval).

The scorer behind :class:`pipeline.evaluate.fast_lm.FastMCLM`. lm-eval asks for
``log P(continuation | context)`` once per choice; HFLM runs every ``context + choice`` as a
separate row and projects *every* position onto the vocabulary. For a 7-way SIB-200 question
that is 7 full forwards of the text; for Gemma 3's 262k vocabulary the output layer is a
large part of the work (0.34 GFLOP per position against ~0.2 for its 18 decoder layers;
45% of a plain 180-token forward on the CPU). Here:

1. **Inputs as HFLM builds them.** ``(context + continuation)[-(max_length + 1):][:-1]``: left
   truncation to the model's length, the last continuation token is only a target; the
   last ``len(continuation)`` positions are scored (:func:`model_input`).
2. **Groups.** Requests are sorted by their input tokens and a request joins the previous
   group when the group's common prefix, computed once, saves enough token-forwards
   (:func:`group_requests`): the choices of one question share the question; XNLI's
   hypotheses share the premise (also across the three hypotheses of one premise).
3. **Two forwards per batch of groups.** The prefixes, left-padded to one length (an
   attention mask hides the pads, explicit position ids keep each row's positions, and the
   distance between real tokens is unchanged, so sliding windows see what they would
   unpadded), with the KV cache kept; then each distinct input's remaining tokens after its
   group's prefix (equal inputs, e.g. one-token choices, share one row), right-padded
   (causal attention never looks at later pads), on the cache
   selected per row. Groups are batched by length (longest first) under a bound on the
   scored positions per batch, which bounds the float32 log-probabilities held at once.
4. **Output layer only where scored.** ``logits_to_keep`` as a boolean mask: the model
   applies its own output layer (tied or not, soft-capped or scaled) to the scored positions
   only. A position in a shared prefix is projected once for all the requests of the group.

Log-likelihoods equal HFLM's up to float rounding (tests: <= 1e-3 nats in float32) and
``is_greedy`` is the same argmax test. :func:`supports_fast_scoring` probes once per model
that ``logits_to_keep`` and the KV cache give the model's own full-forward numbers.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pipeline.errors import LangpruneError
from pipeline.models import input_embeddings, output_embeddings, weight_of

log = logging.getLogger(__name__)

# Bound on the scored positions of one batch: 256 x 262k float32 log-probabilities = 256 MiB.
_LOGPROB_BYTES = 1 << 28
_MAX_ROWS = 64  # requests per group (rows of its second forward)
# Token-forwards a join must save: below this, sharing a short prefix (say BOS) is not worth
# a longer second forward, and it would shrink the prefix the next requests could share.
_JOIN_MARGIN = 8
_PROBE_TOL = 1e-4  # float32 probe; relative to the logits' magnitude


@dataclass
class Group:
    """Requests whose inputs share ``prefix`` (computed once).

    Attributes:
        prefix: The common input tokens.
        members: Indices into the request list.
        distinct: The members' distinct inputs (equal inputs, e.g. one-token choices of one
            question, share one row of the second forward).
        total: Sum of the lengths of the distinct inputs (for the grouping cost).
    """

    prefix: list[int]
    members: list[int] = field(default_factory=list)
    distinct: set[tuple[int, ...]] = field(default_factory=set)
    total: int = 0

    def cost(self) -> int:
        """Token-forwards: the prefix once, then each distinct input's remaining tokens."""
        return len(self.prefix) + self.total - len(self.distinct) * len(self.prefix)

    def add(self, index: int, inp: list[int]) -> None:
        self.members.append(index)
        if tuple(inp) not in self.distinct:
            self.distinct.add(tuple(inp))
            self.total += len(inp)


def model_input(context: list[int], continuation: list[int], max_length: int) -> list[int]:
    """The tokens HFLM feeds for one request (left-truncated; without the last target).

    Raises:
        LangpruneError: when the continuation alone is longer than ``max_length`` (HFLM
            asserts the same).
    """
    if not context or not continuation:
        raise LangpruneError("a loglikelihood request needs a non-empty context and continuation")
    if len(continuation) > max_length:
        raise LangpruneError(f"continuation of {len(continuation)} tokens is longer than the "
                             f"model's maximum length {max_length}")
    return (context + continuation)[-(max_length + 1):][:-1]


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def group_requests(inputs: list[list[int]], max_rows: int = _MAX_ROWS) -> list[Group]:
    """Groups of requests sharing an input prefix, chosen greedily in sorted order.

    A request joins the last group when the group's (possibly shorter) common prefix plus
    every distinct input's remaining tokens costs at least :data:`_JOIN_MARGIN` fewer
    token-forwards than keeping it apart (an equal input always joins).
    """
    groups: list[Group] = []
    for i in sorted(range(len(inputs)), key=lambda i: inputs[i]):
        inp = inputs[i]
        g = groups[-1] if groups else None
        if g is not None and len(g.members) < max_rows:
            p = _common_prefix(g.prefix, inp, len(g.prefix))
            new = tuple(inp) not in g.distinct
            joined = p + g.total + new * len(inp) - (len(g.distinct) + new) * p
            if p > 0 and (not new or joined + _JOIN_MARGIN <= g.cost() + len(inp)):
                g.prefix = g.prefix[:p]
                g.add(i, inp)
                continue
        groups.append(Group(list(inp)))
        groups[-1].add(i, inp)
    return groups


def _scored_start(inp: list[int], continuation: list[int]) -> int:
    return len(inp) - len(continuation)


def _batches(groups: list[Group], inputs: list[list[int]], conts: list[list[int]],
             max_groups: int, max_scored: int) -> list[list[Group]]:
    """Groups by descending prefix length, cut at ``max_groups`` or ``max_scored`` positions
    (a group's scored positions: those of its prefix, once, and its distinct inputs' tails)."""
    out: list[list[Group]] = []
    scored = 0
    for g in sorted(groups, key=lambda g: -len(g.prefix)):
        first = min(_scored_start(inputs[m], conts[m]) for m in g.members)
        n = max(0, len(g.prefix) - first) + g.total - len(g.distinct) * len(g.prefix)
        if not out or len(out[-1]) >= max_groups or scored + n > max_scored:
            out.append([])
            scored = 0
        out[-1].append(g)
        scored += n
    return out


def score(model: nn.Module, requests: list[tuple[list[int], list[int]]], *, max_length: int,
          batch_size: int = 8, pad_id: int = 0,
          progress: bool = True) -> list[tuple[float, bool]]:
    """``(log P(continuation | context), is_greedy)`` for each ``(context, continuation)``.

    Args:
        model: A causal LM with ``logits_to_keep`` and a KV cache (see
            :func:`supports_fast_scoring`), on its device, in eval mode.
        requests: Token ids of each request's context and continuation, as HFLM encodes them.
        max_length: Longest model input (HFLM's ``max_length``).
        batch_size: Groups per forward pass.
        pad_id: Token used for padding (masked or never attended).
        progress: One progress bar over the requests (the long part of a task evaluation).

    Returns:
        One ``(loglik, is_greedy)`` per request, in request order.
    """
    inputs = [model_input(c, k, max_length) for c, k in requests]
    conts = [k for _, k in requests]
    vocab = weight_of(output_embeddings(model)).shape[0]
    max_scored = max(1, _LOGPROB_BYTES // (4 * vocab))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    groups = group_requests(inputs)
    with tqdm(total=len(requests), desc="tasks", unit="req", disable=not progress,
              leave=False) as bar:
        for batch in _batches(groups, inputs, conts, max(1, batch_size), max_scored):
            answers = _score_batch(model, batch, inputs, conts, pad_id)
            for i, answer in answers.items():
                results[i] = answer
            bar.update(len(answers))
    return results


@torch.inference_mode()
def _score_batch(model: nn.Module, batch: list[Group], inputs: list[list[int]],
                 conts: list[list[int]], pad_id: int) -> dict[int, tuple[float, bool]]:
    """Both forwards for one batch of groups; answers by request index."""
    device = weight_of(input_embeddings(model)).device
    width = max(len(g.prefix) for g in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    keep = torch.zeros((len(batch), width), dtype=torch.bool)
    for r, g in enumerate(batch):
        off = width - len(g.prefix)
        ids[r, off:] = torch.tensor(g.prefix)
        mask[r, off:] = 1
        first = min(_scored_start(inputs[m], conts[m]) for m in g.members)
        keep[r, off + first:] = True  # scored by some member, inside the prefix
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    rows = _tail_rows(batch, inputs)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                position_ids=pos.to(device), use_cache=bool(rows), logits_to_keep=keep.to(device))
    # (group row, prefix position) -> row of out.logits (row-major over keep)
    at = {(r, p - (width - len(batch[r].prefix))): k
          for k, (r, p) in enumerate(keep.nonzero().tolist())}
    sources = [_Scored(out.logits, at)]
    if rows:
        sources.append(_suffix_pass(model, batch, rows, inputs, conts, out.cache, mask, pad_id))
    picks: list[tuple[int, int, int, int]] = []  # (member, source, logits row, target)
    for r, g in enumerate(batch):
        for m in g.members:
            start = _scored_start(inputs[m], conts[m])
            for t, tok in enumerate(conts[m]):
                p = start + t
                if p < len(g.prefix):
                    picks.append((m, 0, sources[0].at[(r, p)], tok))
                else:
                    picks.append((m, 1, sources[1].at[(rows[(r, tuple(inputs[m]))], p)], tok))
    return _answers(picks, sources)


@dataclass
class _Scored:
    """Logits of the kept positions of one forward and where each position's row is."""

    logits: torch.Tensor  # [kept positions, V]
    at: dict[tuple[int, int], int]


def _tail_rows(batch: list[Group], inputs: list[list[int]]) -> dict[tuple[int, tuple], int]:
    """(group row, distinct input longer than the prefix) -> row of the second forward."""
    rows: dict[tuple[int, tuple], int] = {}
    for r, g in enumerate(batch):
        for m in g.members:
            if len(inputs[m]) > len(g.prefix):
                rows.setdefault((r, tuple(inputs[m])), len(rows))
    return rows


def _suffix_pass(model: nn.Module, batch: list[Group], rows: dict[tuple[int, tuple], int],
                 inputs: list[list[int]], conts: list[list[int]], cache,
                 prefix_mask: torch.Tensor, pad_id: int) -> _Scored:
    """Second forward: each distinct input's tokens after its group's prefix, on the cache."""
    device = weight_of(input_embeddings(model)).device
    width = max(len(inp) - len(batch[r].prefix) for r, inp in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    keep = torch.zeros((len(rows), width), dtype=torch.bool)
    first: dict[Any, Any] = {}
    for r, g in enumerate(batch):
        for m in g.members:
            key = (r, tuple(inputs[m]))
            if key in rows:
                first[key] = min(first.get(key, len(inputs[m])), _scored_start(inputs[m], conts[m]))
    select = torch.zeros(len(rows), dtype=torch.long)
    plen = torch.zeros((len(rows), 1), dtype=torch.long)
    for (r, inp), i in rows.items():
        n = len(batch[r].prefix)
        ids[i, : len(inp) - n] = torch.tensor(inp[n:])
        keep[i, max(0, first[(r, inp)] - n) : len(inp) - n] = True
        select[i], plen[i] = r, n
    cache.batch_select_indices(select.to(device))
    mask = torch.cat([prefix_mask[select], torch.ones((len(rows), width), dtype=torch.long)], 1)
    pos = plen + torch.arange(width)
    res = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                position_ids=pos.to(device), cache=cache, use_cache=True,
                logits_to_keep=keep.to(device))
    back = {i: r for (r, _), i in rows.items()}
    # (row, position after its prefix) -> logits row; keyed by prefix position for lookups
    at = {(i, p + len(batch[back[i]].prefix)): k
          for k, (i, p) in enumerate(keep.nonzero().tolist())}
    return _Scored(res.logits, at)


def _answers(picks: list[tuple[int, int, int, int]],
             sources: list[_Scored]) -> dict[int, tuple[float, bool]]:
    """Sum each member's target log-probabilities; greedy when every target is the argmax."""
    loglik: dict[int, float] = {}
    greedy: dict[int, bool] = {}
    for s, src in enumerate(sources):
        sel = [(m, k, tok) for m, source, k, tok in picks if source == s]
        if not sel:
            continue
        # log_softmax, as HFLM: torch.logsumexp rounds differently (up to 6e-5 nats per
        # position over Gemma's 262k-token vocabulary, 1e-3 over an XNLI sentence).
        logprobs = F.log_softmax(src.logits.float(), dim=-1)
        rows = torch.tensor([k for _, k, _ in sel], device=logprobs.device)
        toks = torch.tensor([t for _, _, t in sel], device=logprobs.device)
        values = logprobs[rows, toks].double().tolist()
        hits = (logprobs.argmax(dim=-1)[rows] == toks).tolist()
        for (m, _, _), v, h in zip(sel, values, hits, strict=True):
            loglik[m] = loglik.get(m, 0.0) + v
            greedy[m] = greedy.get(m, True) and h
    return {m: (loglik[m], greedy[m]) for m in loglik}


# Probe answers per model object, held weakly (the model is never written to, and a model
# that is freed takes its entry with it); keyed again by the output layer it was probed with.
_FAST_SCORING: weakref.WeakKeyDictionary[nn.Module, tuple[int, bool]] = weakref.WeakKeyDictionary()


@torch.inference_mode()
def supports_fast_scoring(model: nn.Module, probe: list[int]) -> bool:
    """True when :func:`score`'s forwards reproduce the model's own full logits.

    Checks ``logits_to_keep`` (a boolean mask), left padding with position ids, and a KV
    cache selected per row against one plain forward of ``probe``. Models that lack any of
    these (or misuse them) get False and are scored by HFLM instead. Kept per model.
    """
    key = id(output_embeddings(model))
    cached = _FAST_SCORING.get(model)
    if cached is not None and cached[0] == key:
        return bool(cached[1])
    try:
        ok = _probe(model, probe)
    except (TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
        log.warning("fast scoring unavailable for %s (%s)", type(model).__name__, e)
        ok = False
    _FAST_SCORING[model] = (key, ok)
    return ok


@torch.inference_mode()
def reference_score(model: nn.Module, requests: list[tuple[list[int], list[int]]]
                    ) -> list[tuple[float, bool]]:
    """What HFLM computes, one plain full-logits forward per request (no truncation)."""
    device = weight_of(input_embeddings(model)).device
    out = []
    for context, continuation in requests:
        ids = torch.tensor([context + continuation[:-1]], device=device)
        logits = model(input_ids=ids, use_cache=False).logits[0, -len(continuation):]
        logprobs = F.log_softmax(logits.float(), dim=-1)
        target = torch.tensor(continuation, device=device)
        picked = logprobs.gather(1, target[:, None]).squeeze(1)
        out.append((float(picked.sum()), bool((logprobs.argmax(dim=-1) == target).all())))
    return out


@torch.inference_mode()
def _probe(model: nn.Module, probe: list[int]) -> bool:
    half = len(probe) // 2
    # A group split into prefix + suffix, a prefix-only member, and a shorter, left-padded
    # group in the same batch.
    reqs = [(probe[:half], probe[half:]), (probe[:half], probe[half : half + 1]),
            (probe[1:half], probe[half:])]
    got = score(model, reqs, max_length=len(probe) + 1, batch_size=len(reqs))
    want = reference_score(model, reqs)
    dtype = weight_of(output_embeddings(model)).dtype
    tol = 2e-2 if dtype in (torch.float16, torch.bfloat16) else _PROBE_TOL
    return all(abs(g[0] - w[0]) <= tol * (1.0 + abs(w[0])) for g, w in zip(got, want, strict=True))
