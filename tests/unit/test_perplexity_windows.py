"""Per-window perplexity records: the totals' own numbers, tokens and a byte partition."""

from __future__ import annotations

import math

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import ByT5Tokenizer, PreTrainedTokenizerFast

from pipeline.evaluate import perplexity as P
from tests.tiny import tiny_model
from tests.unit.test_perplexity import CHARS, BigramLM, CharTokenizer, lp


class DecodingCharTokenizer(CharTokenizer):
    def decode(self, ids: list[int]) -> str:
        back = {v: k for k, v in CHARS.items()}
        return "".join(back[i] for i in ids)


def test_bigram_windows_match_hand_computation():
    # "ab\nba" -> windows [BOS a b] [BOS \n b] [BOS a] (seq_len 3)
    res, recs = P.evaluate_perplexity_windows(BigramLM(), DecodingCharTokenizer(), ["ab", "ba"],
                                              seq_len=3, batch_size=2, progress=False)
    assert [r.window for r in recs] == [0, 1, 2]
    assert [r.n_tokens for r in recs] == [2, 2, 1]
    assert [r.n_bytes for r in recs] == [2, 2, 1]  # "ab", "\nb", "a"
    want = [-(lp(0, 1) + lp(1, 2)), -(lp(0, 3) + lp(3, 2)), -lp(0, 1)]
    assert [r.nll_sum for r in recs] == pytest.approx(want, rel=1e-6)
    assert res == P.evaluate_perplexity(BigramLM(), CharTokenizer(), ["ab", "ba"], seq_len=3,
                                        batch_size=2, progress=False)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_records_sum_to_the_unchanged_result(batch_size):
    tok = ByT5Tokenizer()  # one token per byte: each window's bytes equal its tokens
    sents = ["The first sentence.", "A second, longer one, to cut into windows.", "Third."]
    model = tiny_model("llama")
    res, recs = P.evaluate_perplexity_windows(model, tok, sents, seq_len=10,
                                              batch_size=batch_size, progress=False)
    assert res == P.evaluate_perplexity(model, tok, sents, seq_len=10, batch_size=batch_size,
                                        progress=False)  # bit-identical
    assert len(recs) == res.n_windows == math.ceil(res.n_tokens / 9)
    assert sum(r.n_tokens for r in recs) == res.n_tokens
    assert [r.n_bytes for r in recs] == [r.n_tokens for r in recs]
    assert math.fsum(r.nll_sum for r in recs) == pytest.approx(res.nll_sum, rel=1e-12)
    assert all(r.nll_sum > 0 for r in recs)


def test_window_bytes_partition_the_text_with_multibyte_characters():
    tok = ByT5Tokenizer()
    sents = ["Grüße aus 你好 Köln", "ok ünd"]
    res, recs = P.evaluate_perplexity_windows(tiny_model("llama"), tok, sents, seq_len=5,
                                              progress=False)
    assert sum(r.n_bytes for r in recs) == res.n_bytes == len("\n".join(sents).encode())
    assert all(r.n_bytes >= 0 for r in recs)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A fast (Rust) word-level tokenizer: the offsets path."""
    words = ["<s>", "<unk>", "hello", "world", "über", "grüße", "and", "more", "words"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", unk_token="<unk>")


def test_fast_tokenizer_offsets_give_exact_window_bytes():
    tok = word_tokenizer()
    text = "hello world über\ngrüße and more words"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 7
    ends = P.window_byte_ends(tok, text, ids, [3, 3, 1])
    # windows: "hello world über" | "\ngrüße and more" | " words"
    assert ends == [len("hello world über".encode()), len(text[:-6].encode()), len(text.encode())]
