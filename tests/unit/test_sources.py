"""Text sources: bundled files load, roles never overlap, bad files give clear errors, and
hub sources work against local stand-ins and fail fast offline."""

from __future__ import annotations

import gzip
import http.server
import json
import socket
import threading
from pathlib import Path

import pytest

from pipeline.data import hub_sources, sources
from pipeline.data.languages import REQUIRED, all_languages, get_language
from pipeline.errors import LangpruneError
from pipeline.paths import REPO_ROOT

DATA = REPO_ROOT / "data"
CALIB_PAIRS = [(src, lang.code) for lang in all_languages() for src in lang.calibration_sources]


# ---- bundled data ------------------------------------------------------------------------------
def test_data_folder_is_small():
    total = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    assert total < 40 * 1024 * 1024, f"data/ is {total / 2**20:.1f} MiB"


def _data_files() -> list[str]:
    return sorted(str(p.relative_to(DATA)) for p in DATA.rglob("*.jsonl*"))


def test_every_bundled_file_is_documented_and_has_provenance():
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    provenance = json.loads((DATA / "provenance.json").read_text(encoding="utf-8"))
    files = _data_files()
    assert files, "no bundled data files"
    undocumented = [f for f in files if f"`{f}`" not in readme]
    assert not undocumented, f"not listed in data/README.md: {undocumented}"
    assert sorted(p["file"] for p in provenance) == files
    for entry in provenance:
        assert entry["license"] and entry["sources"][0]["commit"]


def test_provenance_record_counts_match_files():
    provenance = json.loads((DATA / "provenance.json").read_text(encoding="utf-8"))
    for entry in provenance:
        with gzip.open(DATA / entry["file"], "rt", encoding="utf-8") as fh:
            n = sum(1 for line in fh if line.strip())
        assert n == entry["records"], entry["file"]


@pytest.mark.parametrize("source, lang", CALIB_PAIRS)
def test_bundled_calibration_sources_load(source, lang):
    docs = sources.load_documents(source, lang)
    assert docs and all(isinstance(d, sources.Document) for d in docs)
    assert len({d.doc_id for d in docs}) == len(docs)
    assert all(d.text.strip() for d in docs)


def test_ntrex_is_parallel_news_documents():
    ids = {lang: [d.doc_id for d in sources.load_documents("ntrex", lang)] for lang in REQUIRED}
    assert len(ids["en"]) == 123  # the 123 newstest2019 documents
    assert all(v == ids["en"] for v in ids.values())
    first = sources.load_documents("ntrex", "de")[0]
    lines = first.text.split(sources.SENTENCE_JOIN)
    with gzip.open(DATA / "ntrex128/de.jsonl.gz", "rt", encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh]
    assert lines == [r["text"].strip() for r in records if r["doc_id"] == first.doc_id]


def test_tico19_english_borrows_aligned_document_ids():
    en = sources.load_documents("tico19", "en")
    sw = sources.load_documents("tico19", "sw")
    assert [d.doc_id for d in en] == [d.doc_id for d in sw]
    assert len(en) == 19
    assert [len(d.text.split("\n")) for d in en] == [len(d.text.split("\n")) for d in sw]


@pytest.mark.parametrize("lang", [lang.code for lang in all_languages()])
def test_flores_eval_sentences_are_parallel(lang):
    sentences = sources.load_eval_sentences("flores", lang)
    assert len(sentences) == 1012
    docs = sources.load_documents("flores", lang)
    assert sources.SENTENCE_JOIN.join(d.text for d in docs) == sources.SENTENCE_JOIN.join(sentences)


@pytest.mark.parametrize("source, lang", CALIB_PAIRS)
def test_calibration_never_overlaps_flores_devtest(source, lang):
    flores = set(sources.load_eval_sentences("flores", lang))
    docs = sources.load_documents(source, lang)
    lines = {line.strip() for d in docs for line in d.text.split("\n")}
    assert not lines & flores
    if source == "tydiqa":  # paragraphs, not sentences: look for FLORES sentences inside
        blob = "\n".join(d.text for d in docs)
        assert not [s for s in flores if len(s) > 40 and s in blob]


# ---- errors ------------------------------------------------------------------------------------
def test_unknown_source_suggests():
    with pytest.raises(LangpruneError, match="did you mean ntrex"):
        sources.load_documents("ntrx", "en")


def test_language_missing_from_source_lists_alternatives():
    with pytest.raises(LangpruneError) as err:
        sources.load_documents("wmt", "sw")
    msg = str(err.value)
    assert "'wmt' has no Swahili (sw)" in msg
    assert "ntrex, tico19, tydiqa" in msg and "mc4 (hub)" in msg


def test_unknown_language():
    with pytest.raises(LangpruneError, match="unknown language 'klingon'"):
        sources.load_documents("ntrex", "klingon")


def test_eval_sentences_need_an_eval_source():
    with pytest.raises(LangpruneError, match="'ntrex' is a calibration source"):
        sources.load_eval_sentences("ntrex", "en")


def _fake_data(tmp_path, monkeypatch, payload: bytes, name: str = "en.jsonl.gz") -> Path:
    folder = tmp_path / "ntrex128"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(payload)
    monkeypatch.setenv("LANGPRUNE_DATA", str(tmp_path))
    return path


def _gz(text: str, encoding: str = "utf-8") -> bytes:
    return gzip.compress(text.encode(encoding))


@pytest.mark.parametrize(
    "payload, fragment",
    [
        (b"this is not gzip at all", "corrupt or truncated"),
        (_gz('{"doc_id": "a", "text": "hello world"}\n' * 200)[:40], "corrupt or truncated"),
        (_gz('{"doc_id": "a", "text": "Stra\u00dfe caf\u00e9"}\n', "latin-1"), "not valid UTF-8"),
        (
            _gz('{"doc_id": "a", "text": "ok"}\n{"doc_id": "b", "text": \n'),
            "line 2: not valid JSON",
        ),
        (_gz('["a list"]\n'), "expected a JSON object"),
        (_gz('{"doc_id": "a", "body": "no text field"}\n'), "field 'text' missing"),
        (_gz(""), "is empty"),
        (_gz('{"doc_id": "a", "text": ""}\n{"doc_id": "b", "text": "  "}\n'), "no text"),
    ],
    ids=[
        "not-gzip",
        "truncated",
        "latin1",
        "bad-json",
        "not-object",
        "no-field",
        "empty",
        "blank-text",
    ],
)
def test_bad_files_name_the_file(tmp_path, monkeypatch, payload, fragment):
    path = _fake_data(tmp_path, monkeypatch, payload)
    with pytest.raises(LangpruneError, match=fragment) as err:
        sources.load_documents("ntrex", "en")
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("LANGPRUNE_DATA", str(tmp_path))
    with pytest.raises(LangpruneError, match="is missing .*LANGPRUNE_DATA"):
        sources.load_documents("ntrex", "en")


def test_plain_jsonl_is_read_too(tmp_path, monkeypatch):
    _fake_data(tmp_path, monkeypatch, b'{"doc_id": "d1", "text": "Hi."}\n', name="en.jsonl")
    assert sources.load_documents("ntrex", "en") == [sources.Document("d1", "Hi.")]


# ---- hub sources -------------------------------------------------------------------------------
class _Recorder:
    """A stand-in for ``datasets.load_dataset`` that serves local rows and records calls."""

    def __init__(self, rows):
        self.rows = rows
        self.calls: list[tuple[tuple, dict]] = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return iter(self.rows) if kwargs.get("streaming") else list(self.rows)


def _read(rel: str) -> list[dict]:
    with gzip.open(DATA / rel, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture
def online(monkeypatch):
    """Pretend the hub is reachable; ``datasets.load_dataset`` is replaced per test."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub_sources, "_hub_reachable", lambda endpoint, timeout: True)
    import datasets

    def install(rows):
        fake = _Recorder(rows)
        monkeypatch.setattr(datasets, "load_dataset", fake)
        return fake

    return install


def test_mc4_streams_capped_documents(online, monkeypatch):
    rows = [
        {"text": r["text"], "url": f"http://x/{i}"}
        for i, r in enumerate(_read("ntrex128/sw.jsonl.gz")[:10])
    ]
    rows.insert(2, {"text": "   ", "url": "http://x/blank"})
    fake = online(rows)
    monkeypatch.setattr(hub_sources, "MC4_MAX_DOCUMENTS", 5)
    docs = sources.load_documents("mc4", "sw")
    assert fake.calls == [(("allenai/c4", "sw"), {"split": "train", "streaming": True})]
    assert [d.doc_id for d in docs] == ["http://x/0", "http://x/1", "http://x/2", "http://x/3"]
    assert docs[0].text == rows[0]["text"].strip()


def test_flores_hub_uses_flores_plus_config(online):
    zh = _read("flores200_devtest/zh.jsonl.gz")
    fake = online([{"text": r["sentence"], "url": r["URL"]} for r in zh])
    sentences = sources.load_eval_sentences("flores_hub", "zh")
    assert fake.calls[0] == (("openlanguagedata/flores_plus", "cmn_Hans"), {"split": "devtest"})
    assert sentences == sources.load_eval_sentences("flores", "zh")
    assert len(sources.load_documents("flores_hub", "zh")) == len(
        sources.load_documents("flores", "zh")
    )


def test_belebele_hub_gives_unique_passages(online):
    fake = online(_read("belebele/de.jsonl.gz"))
    passages = sources.load_eval_sentences("belebele_hub", "de")
    assert fake.calls[0] == (("facebook/belebele", "deu_Latn"), {"split": "test"})
    assert len(passages) == 488  # 900 questions over 488 FLORES passages


def test_hub_loader_errors_become_one_line(online, monkeypatch):
    import datasets

    def gated(*args, **kwargs):
        raise ConnectionError("Dataset 'openlanguagedata/flores_plus' is a gated dataset\nmore")

    monkeypatch.setattr(datasets, "load_dataset", gated)
    with pytest.raises(LangpruneError, match="could not load openlanguagedata/flores_plus") as e:
        sources.load_eval_sentences("flores_hub", "de")
    assert "\n" not in str(e.value) and "gated" in str(e.value)


def test_hub_language_missing_lists_alternatives(online):
    online([])
    with pytest.raises(LangpruneError, match="calibration sources with sw"):
        sources.check_available("wmt", "sw")
    assert "mc4" in sources.sources_for("sw", "calibration")


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
@pytest.mark.parametrize("source", ["mc4", "flores_hub", "belebele_hub"])
def test_offline_fails_fast_before_datasets(monkeypatch, var, source):
    import datasets

    for other in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(var, "1")

    def must_not_run(*args, **kwargs):
        raise AssertionError("datasets.load_dataset called while offline")

    monkeypatch.setattr(datasets, "load_dataset", must_not_run)
    monkeypatch.setattr(hub_sources, "_hub_reachable", must_not_run)
    with pytest.raises(LangpruneError, match=f"{var} is set") as err:
        sources.load_documents(source, "de")
    assert "bundled" in str(err.value)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_fails_with_clear_error(monkeypatch):
    import datasets

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(datasets, "load_dataset", pytest.fail)
    with pytest.raises(LangpruneError, match="is unreachable"):
        sources.load_documents("mc4", "en")


def test_reachable_endpoint_counts_any_http_answer(monkeypatch):
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 (http.server naming)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert hub_sources._hub_reachable(f"http://127.0.0.1:{server.server_port}", 5.0)
    finally:
        server.shutdown()
        server.server_close()
    assert not hub_sources._hub_reachable(f"http://127.0.0.1:{_closed_port()}", 2.0)


def test_registry_roles():
    assert sources.get_source("ntrex").role == "calibration"
    assert sources.get_source("flores").role == "eval"
    assert {n for n in sources.SOURCES.names() if sources.get_source(n).hub} == {
        "mc4",
        "flores_hub",
        "belebele_hub",
    }
    assert get_language("zh").hub["flores_plus"] == "cmn_Hans"
