"""Per-document records from run_tasks: stable ids, required columns, refusals, warnings."""

from __future__ import annotations

import gzip
import json
import logging
import textwrap

import pytest
from transformers import ByT5Tokenizer

from pipeline.errors import LangpruneError
from pipeline.evaluate import doc_records as D
from pipeline.evaluate import lm_eval_runner as R
from pipeline.paths import data_dir
from tests.tiny import tiny_model

SUITES = ["sib200", "xnli", "belebele"]


def run(model, scorer: str, limit: int, langs=("en", "de"), tasks=SUITES) -> R.TaskResults:
    return R.run_tasks(model, ByT5Tokenizer(), list(tasks), list(langs), limit=limit,
                       batch_size=4, device="cpu", max_length=1024, scorer=scorer, records=True)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def both(model):
    """The bundled suites in en and de, 3 documents each, under both scorers."""
    return {scorer: run(model, scorer, limit=3) for scorer in R.SCORERS}


def test_fast_and_hflm_agree_document_by_document(both):
    fast, hflm = both["fast"], both["hflm"]
    assert fast.scores == hflm.scores and len(fast.scores) == 6
    a, b = fast.records, hflm.records
    cols = ["task", "lang", "doc_id", "gold", "pred", "correct", "n_choices"]
    assert a[cols].equals(b[cols])
    diffs = [abs(x - y) for la, lb in zip(a.loglik, b.loglik, strict=True)
             for x, y in zip(la, lb, strict=True)]
    assert len(diffs) == 2 * 3 * (7 + 3 + 4) and max(diffs) <= 1e-3


def test_records_have_the_columns_and_match_the_scores(both):
    out = both["fast"]
    rec = out.records
    assert tuple(rec.columns) == D.COLUMNS
    assert len(rec) == 6 * 3 and "samples" not in out.results_json
    assert rec.groupby("task").n_choices.first().to_dict() == {"sib200": 7, "xnli": 3,
                                                               "belebele": 4}
    for row in rec.itertuples():
        assert len(row.loglik) == row.n_choices
        assert row.pred == row.loglik.index(max(row.loglik))
        assert row.correct == (row.pred == row.gold) and 0 <= row.gold < row.n_choices
    acc = rec.groupby(["task", "lang"]).correct.mean()
    assert {f"{t}.{lang}": v for (t, lang), v in acc.items()} == pytest.approx(out.scores)


def data_ids(folder: str, lang: str) -> set[str]:
    with gzip.open(data_dir() / folder / f"{lang}.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    if folder == "sib200":
        return {r["index_id"] for r in rows if r["split"] == "test"}
    if folder == "belebele":
        return {f"{r['link']}#{r['question_number']}" for r in rows}
    return {str(r["id"]) for r in rows}


def test_doc_ids_come_from_the_data_and_are_stable(model, both):
    rec = both["fast"].records
    for suite, folder in R.BUNDLED.items():
        ids = rec[(rec.task == suite) & (rec.lang == "en")].doc_id.tolist()
        assert set(ids) <= data_ids(folder, "en") and len(set(ids)) == 3
        de = rec[(rec.task == suite) & (rec.lang == "de")].doc_id.tolist()
        assert de == ids  # parallel data: the same documents in every language
    again = run(model, "fast", limit=5, langs=["en"]).records
    for suite in SUITES:
        first = rec[(rec.task == suite) & (rec.lang == "en")].set_index("doc_id")
        later = again[again.task == suite].set_index("doc_id")
        assert len(later) == 5 and set(first.index) <= set(later.index)
        assert later.loc[first.index, "gold"].tolist() == first.gold.tolist()


def test_chance_levels(both):
    chance = D.chance_levels(both["fast"].records)
    assert chance[("sib200", "en")] == pytest.approx(1 / 7)
    assert chance[("xnli", "de")] == pytest.approx(1 / 3)
    assert chance[("belebele", "en")] == pytest.approx(1 / 4)


@pytest.fixture
def own_tasks(tmp_path, monkeypatch):
    """A task folder with a 3-document task without ids ("noid") and one with ids ("withid")."""
    (tmp_path / "utils.py").write_text(textwrap.dedent('''
        import datasets

        def load_docs(with_ids=False, **_):
            docs = [{"text": f"document {i}", "label": i % 2} for i in range(3)]
            if with_ids:
                docs = [{**d, "id": f"row-{i}"} for i, d in enumerate(docs)]
            return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
    '''))
    for name, kwargs in (("noid", ""), ("withid", "dataset_kwargs:\n  with_ids: true\n")):
        (tmp_path / f"{name}.yaml").write_text(
            f"task: {name}\ncustom_dataset: !function utils.load_docs\n{kwargs}"
            "output_type: multiple_choice\ntest_split: test\n"
            'doc_to_text: "{{text}}\\nAnswer:"\ndoc_to_choice: ["yes", "no"]\n'
            "doc_to_target: label\nmetric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")
    monkeypatch.setattr(R, "TASKS_DIR", tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return tmp_path


def test_a_task_without_ids_is_refused_before_any_forward(model, own_tasks):
    calls = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(LangpruneError, match=r"^task noid has no per-document id") as e:
            run(model, "fast", limit=2, langs=["en"], tasks=["noid"])
    finally:
        hook.remove()
    assert "\n" not in str(e.value) and calls == []
    out = R.run_tasks(model, ByT5Tokenizer(), ["noid"], ["en"], limit=2, records=False)
    assert out.records is None and "noid.acc" in out.scores


def test_a_limit_above_the_documents_uses_all_and_warns_once(model, own_tasks, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        out = run(model, "fast", limit=5, langs=["en"], tasks=["withid"])
    ours = [r for r in caplog.records if r.name.startswith("pipeline")]
    assert len(ours) == 1 and "\n" not in ours[0].getMessage()
    assert "limit 5" in ours[0].getMessage() and "withid (3)" in ours[0].getMessage()
    assert out.records.doc_id.tolist() == ["row-0", "row-1", "row-2"]
    assert out.results_json["n-samples"]["withid"]["effective"] == 3
