"""Perplexity / bits per byte (definition token_nonoverlap_v1) on hand-computable cases."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import ByT5Tokenizer

from pipeline.errors import LangpruneError
from pipeline.evaluate import perplexity as P
from tests.tiny import tiny_model

# ---- a bigram model and a character tokenizer whose numbers can be worked out by hand ----

CHARS = {"a": 1, "b": 2, "\n": 3}  # id 0 is BOS
# P[prev][next]: row = previous token (BOS, a, b, newline), column = next token.
BIGRAM = [
    [0.05, 0.50, 0.25, 0.20],
    [0.10, 0.10, 0.70, 0.10],
    [0.05, 0.40, 0.15, 0.40],
    [0.05, 0.25, 0.65, 0.05],
]


class CharTokenizer:
    """One token per character of 'ab\\n'; BOS = 0."""

    bos_token_id: int | None = 0
    eos_token_id: int | None = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        assert add_special_tokens is False  # the definition tokenizes without special tokens
        return {"input_ids": [CHARS[c] for c in text]}


class BigramLM(nn.Module):
    """logits[t] = log P[token_t]: one-hot embedding through a head holding log P."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(4, 4)
        self.head = nn.Linear(4, 4, bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(torch.eye(4))
            self.head.weight.copy_(torch.tensor(BIGRAM).log().T)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        return SimpleNamespace(logits=self.head(self.embed(input_ids)))


def lp(prev: int, nxt: int) -> float:
    return math.log(BIGRAM[prev][nxt])


def test_bigram_perplexity_matches_hand_computation():
    # "ab" + "\n" + "ba" = tokens a b \n b a; seq_len 3 -> windows [BOS a b] [BOS \n b] [BOS a]
    res = P.evaluate_perplexity(BigramLM(), CharTokenizer(), ["ab", "ba"], seq_len=3,
                                batch_size=2, progress=False)
    expected = -(lp(0, 1) + lp(1, 2)) - (lp(0, 3) + lp(3, 2)) - lp(0, 1)
    assert res.n_windows == 3
    assert res.n_tokens == 5
    assert res.n_bytes == 5
    assert res.nll_sum == pytest.approx(expected, rel=1e-6)
    assert res.ppl == pytest.approx(math.exp(expected / 5), rel=1e-6)
    assert res.bpb == pytest.approx(expected / math.log(2) / 5, rel=1e-6)
    assert res.definition == P.DEFINITION == "token_nonoverlap_v1"


def test_window_boundaries_change_the_value_as_defined():
    # One window holds everything: the context of 'b' after the newline is the newline.
    res = P.evaluate_perplexity(BigramLM(), CharTokenizer(), ["ab", "ba"], seq_len=16,
                                progress=False)
    expected = -(lp(0, 1) + lp(1, 2) + lp(2, 3) + lp(3, 2) + lp(2, 1))
    assert res.n_windows == 1
    assert res.nll_sum == pytest.approx(expected, rel=1e-6)


def test_cut_windows():
    assert P.cut_windows([1, 2, 3, 4, 5, 6, 7], seq_len=4, start_id=0) == [
        [0, 1, 2, 3], [0, 4, 5, 6], [0, 7]
    ]
    assert P.cut_windows([1, 2, 3], seq_len=4, start_id=9) == [[9, 1, 2, 3]]


def test_token_budget_takes_the_shortest_prefix_of_whole_sentences():
    tok = ByT5Tokenizer()  # one token per UTF-8 byte
    sents = ["abc", "de", "fgh", "ij"]  # joined prefixes: 3, 6, 10, 13 tokens
    assert P.select_text(tok, sents, 6)[0] == 2
    assert P.select_text(tok, sents, 7)[0] == 3
    assert P.select_text(tok, sents, 1)[0] == 1
    k, ids = P.select_text(tok, sents, 0)
    assert (k, len(ids)) == (4, 13)
    assert P.select_text(tok, sents, 1000)[0] == 4  # budget larger than the text: all of it


def test_budget_result_counts_tokens_and_bytes_of_selected_text():
    tok = ByT5Tokenizer()
    sents = ["Grüße", "你好", "ok"]  # 7 + 1 + 6 bytes, then + 1 + 2
    model = tiny_model("llama")
    res = P.evaluate_perplexity(model, tok, sents, seq_len=8, token_budget=10, progress=False)
    text = "Grüße\n你好"
    assert res.n_sentences == 2
    assert res.n_bytes == len(text.encode("utf-8")) == 14
    assert res.n_tokens == 14  # byte-level tokenizer: one token per byte
    assert res.n_windows == 2  # chunks of 7 tokens after the start token
    assert res.bpb == pytest.approx(res.nll_sum / math.log(2) / 14)


def direct_nll(model: nn.Module, windows: list[list[int]]) -> float:
    """Reference: one window at a time, full logits, a Python loop over positions."""
    total = 0.0
    with torch.no_grad():
        for w in windows:
            logp = F.log_softmax(model(torch.tensor([w])).logits[0].double(), dim=-1)
            total -= sum(float(logp[t, w[t + 1]]) for t in range(len(w) - 1))
    return total


@pytest.mark.parametrize("family", ["llama", "gemma3", "cohere"])
def test_matches_a_direct_per_token_loop(family):
    tok = ByT5Tokenizer()  # no BOS: windows start with EOS (id 1)
    model = tiny_model(family)
    sents = ["The cat sat.", "On the mat, quietly!", "Fin."]
    res = P.evaluate_perplexity(model, tok, sents, seq_len=10, batch_size=2, progress=False)
    ids = tok("\n".join(sents), add_special_tokens=False)["input_ids"]
    expected = direct_nll(model, P.cut_windows(ids, 10, tok.eos_token_id))
    assert res.nll_sum == pytest.approx(expected, rel=1e-5)
    assert res.n_tokens == len(ids)


def test_batch_size_and_loss_path_do_not_change_the_value():
    tok = ByT5Tokenizer()
    model = tiny_model("llama")
    sents = ["Some evaluation text.", "More of it follows here."]
    a = P.evaluate_perplexity(model, tok, sents, seq_len=6, batch_size=1, progress=False)
    b = P.evaluate_perplexity(model, tok, sents, seq_len=6, batch_size=5, progress=False)
    assert a.nll_sum == pytest.approx(b.nll_sum, rel=1e-6)
    ids = torch.tensor([P.cut_windows(tok("abcdefgh", add_special_tokens=False)["input_ids"],
                                      9, 1)[0]])
    chunked = P.window_nll(model, ids, chunked=True)
    full = P.window_nll(model, ids, chunked=False)
    assert torch.allclose(chunked, full, rtol=1e-6)


def test_logit_post_processing_is_detected():
    # Cohere multiplies its logits by logit_scale after the projection: chunks of hidden
    # states through the head would be wrong, so the probe must say so.
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    assert P.head_matches_forward(tiny_model("llama"), ids)
    assert not P.head_matches_forward(tiny_model("cohere"), ids)


def test_start_token_prefers_bos_then_eos():
    assert P.start_token_id(CharTokenizer()) == 0
    assert P.start_token_id(ByT5Tokenizer()) == ByT5Tokenizer().eos_token_id
    bare = SimpleNamespace(bos_token_id=None, eos_token_id=None)
    with pytest.raises(LangpruneError, match="neither a BOS nor an EOS"):
        P.start_token_id(bare)


@pytest.mark.parametrize(
    ("sentences", "kwargs", "match"),
    [
        (["ab"], {"seq_len": 1}, "eval_seq_len"),
        (["ab"], {"seq_len": 4, "batch_size": 0}, "eval_batch_size"),
        ([], {"seq_len": 4}, "no evaluation text"),
        ([""], {"seq_len": 4}, "no evaluation text"),
    ],
)
def test_bad_input_is_a_clear_error(sentences, kwargs, match):
    with pytest.raises(LangpruneError, match=match):
        P.evaluate_perplexity(BigramLM(), CharTokenizer(), sentences, progress=False, **kwargs)


def test_the_head_probe_runs_once_per_model_not_once_per_language(monkeypatch):
    tok = ByT5Tokenizer()
    model, other = tiny_model("llama"), tiny_model("cohere")
    calls = []
    real = P.head_matches_forward
    monkeypatch.setattr(P, "head_matches_forward",
                        lambda m, ids: calls.append(type(m).__name__) or real(m, ids))
    sents = ["Some evaluation text.", "More of it follows here."]
    first = P.evaluate_perplexity(model, tok, sents, seq_len=6, progress=False)
    again = P.evaluate_perplexity(model, tok, sents[::-1], seq_len=6, progress=False)
    P.evaluate_perplexity(other, tok, sents, seq_len=6, progress=False)
    assert len(calls) == 2  # once for each model
    assert first.nll_sum > 0 and again.nll_sum > 0
    model.lm_head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features,
                                    bias=False)  # a new head is probed again
    P.evaluate_perplexity(model, tok, sents, seq_len=6, progress=False)
    assert len(calls) == 3
    # the cached answers are the probes': cohere post-processes its logits, llama does not
    assert P._HEAD_MATCHES[other][1] is False  # kept beside the model, never on it
    assert P._HEAD_MATCHES[model][1] is True
    assert "_langprune_head_matches" not in model.__dict__
