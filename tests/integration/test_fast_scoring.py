"""FastMCLM / mc_scoring give HFLM's log-likelihoods and is_greedy, request by request."""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from transformers import ByT5Tokenizer, LlamaForCausalLM

from pipeline.evaluate import mc_scoring
from pipeline.evaluate.fast_lm import FastMCLM
from pipeline.evaluate.lm_eval_runner import make_lm
from tests.tiny import FAMILIES, VOCAB, tiny_model

TOL = 1e-3  # nats, float32


def tied_llama() -> LlamaForCausalLM:
    cfg = tiny_model("llama").config
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return model


def greedy_tokens(model, context: list[int], n: int) -> list[int]:
    """The model's own argmax continuation of ``context`` (so is_greedy can be True)."""
    ids = list(context)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(context):]


def token_requests(model, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Shared and distinct contexts, continuations of 1-5 tokens, greedy ones, duplicates,
    a continuation that is a prefix of another, and contexts longer than max_length."""
    gen = torch.Generator().manual_seed(seed)

    def rand(n: int) -> list[int]:
        return torch.randint(3, VOCAB, (n,), generator=gen).tolist()

    reqs = []
    for n_ctx in (1, 5, 13, 30, 45):  # 30 and 45 exceed max_length below: left truncation
        ctx = rand(n_ctx)
        conts = [rand(k) for k in (1, 1, 2, 3, 5)]
        conts += [greedy_tokens(model, ctx, 1), greedy_tokens(model, ctx, 3), conts[3][:2]]
        reqs += [(ctx, c) for c in conts]
    reqs.append(reqs[0])  # an exact duplicate
    ctx, cont = reqs[12]  # 5 continuation tokens
    reqs.append((ctx + cont[:1], cont[1:]))  # the same tokens, split one later
    return reqs


def hflm_answers(model, reqs, max_length: int) -> list[tuple[float, bool]]:
    # Without HFLM's logits cache: it reuses one request's logits for every request with the
    # same context + continuation[:-1] tokens and gathers the wrong positions when their
    # contexts end at different tokens (the last request of token_requests).
    hf = HFLM(pretrained=model, tokenizer=ByT5Tokenizer(), batch_size=4, max_length=max_length,
              device="cpu", logits_cache=False)
    keyed = [((repr(c), repr(k)), c, k) for c, k in reqs]
    return hf._loglikelihood_tokens(keyed, disable_tqdm=True)


def assert_same(got, want) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert abs(g[0] - w[0]) <= TOL, (i, g, w)
        assert g[1] == w[1], (i, g, w)


@pytest.mark.parametrize("family", [*FAMILIES, "tied_llama"])
def test_scores_equal_hflm_request_by_request(family):
    model = tied_llama() if family == "tied_llama" else tiny_model(family)
    reqs = token_requests(model)
    want = hflm_answers(model, reqs, max_length=28)
    assert any(g for _, g in want) and not all(g for _, g in want)  # greedy both ways
    for batch_size in (1, 3, 16):  # one group per forward, left-padded batches, all at once
        got = mc_scoring.score(model, reqs, max_length=28, batch_size=batch_size)
        assert_same(got, want)
    assert mc_scoring.supports_fast_scoring(model, reqs[-1][0] + reqs[-1][1])


def test_groups_share_prefixes_and_equal_inputs():
    inputs = [[5, 6, 7], [5, 6, 7], [5, 6, 8, 9], [9] * 12, [9] * 12 + [4], [9] * 12]
    groups = mc_scoring.group_requests(inputs)
    assert sorted(sorted(g.members) for g in groups) == [[0, 1], [2], [3, 4, 5]]
    by_first = {g.members[0]: g for g in groups}
    assert by_first[0].prefix == [5, 6, 7] and len(by_first[0].distinct) == 1
    assert by_first[3].prefix == [9] * 12 and len(by_first[3].distinct) == 2
    # Two Belebele questions on one passage, four equal inputs (one-token choices) each.
    passage = list(range(10, 30))
    inputs = [passage + [1, 2, 3]] * 4 + [passage + [4, 5, 6]] * 4
    (group,) = mc_scoring.group_requests(inputs)
    assert group.prefix == passage and group.cost() == 20 + 3 + 3
    # Two unrelated inputs sharing one token are cheaper apart.
    assert len(mc_scoring.group_requests([[1, 2, 3, 4, 5, 6], [1, 7, 8, 9, 10, 11]])) == 2


def instances(pairs: list[tuple[str, str]]) -> list[Instance]:
    return [Instance("loglikelihood", {}, pair, i, ("t", i // 3, 1))
            for i, pair in enumerate(pairs)]


def test_fast_lm_loglikelihood_equals_hflm_and_uses_the_fast_path(monkeypatch):
    model = tiny_model("gemma3")  # sliding-window layers; tied output embedding
    pairs = [("Question: what is it?\nAnswer:", c) for c in (" yes", " no", " maybe not")]
    pairs += [("", "an empty context scores the whole text"), ("", "another one"),
              ("Topic:", " sports"), ("Topic: ", "travel"), ("x" * 60, " long")]
    reqs = instances(pairs)
    want = make_lm(model, ByT5Tokenizer(), scorer="hflm", max_length=48).loglikelihood(
        reqs, disable_tqdm=True)
    calls = []
    real = mc_scoring.score
    monkeypatch.setattr(mc_scoring, "score",
                        lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    lm = make_lm(model, ByT5Tokenizer(), scorer="fast", max_length=48)
    assert isinstance(lm, FastMCLM)
    assert_same(lm.loglikelihood(reqs, disable_tqdm=True), want)
    assert calls[-1] == len(reqs)  # after the one-off probe, all requests in one call


def test_loglikelihood_rolling_stays_hflms(monkeypatch):
    model = tiny_model("llama")
    texts = instances([("Some text to score as a whole.",), ("x" * 70,)])
    for inst in texts:
        inst.request_type = "loglikelihood_rolling"
    want = HFLM(pretrained=model, tokenizer=ByT5Tokenizer(), max_length=32).loglikelihood_rolling(
        texts, disable_tqdm=True)
    monkeypatch.setattr(mc_scoring, "score", lambda *a, **k: pytest.fail("fast path used"))
    got = make_lm(model, ByT5Tokenizer(), scorer="fast", max_length=32).loglikelihood_rolling(
        texts, disable_tqdm=True)
    assert got == pytest.approx(want, abs=1e-6)
    assert len(got) == 2 and all(v < 0 for v in got)


def test_models_the_probe_rejects_are_scored_by_hflm(monkeypatch, caplog):
    model = tiny_model("llama")
    monkeypatch.setattr(mc_scoring, "supports_fast_scoring", lambda *a: False)
    monkeypatch.setattr(mc_scoring, "score", lambda *a, **k: pytest.fail("fast path used"))
    reqs = instances([("Topic:", " sports"), ("Topic:", " travel")])
    want = HFLM(pretrained=model, tokenizer=ByT5Tokenizer()).loglikelihood(reqs, disable_tqdm=True)
    got = make_lm(model, ByT5Tokenizer(), scorer="fast").loglikelihood(reqs, disable_tqdm=True)
    assert got == want
    assert "scoring with HFLM" in caplog.text


def test_unknown_scorer_is_refused():
    from pipeline.errors import LangpruneError

    with pytest.raises(LangpruneError, match="unknown scorer 'fsat'.*did you mean.*fast"):
        make_lm(tiny_model("llama"), ByT5Tokenizer(), scorer="fsat")
