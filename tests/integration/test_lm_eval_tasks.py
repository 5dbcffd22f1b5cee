"""Our lm-eval task YAMLs: they load and run offline on a tiny random model; names expand."""

from __future__ import annotations

import importlib.util
import json
import socket
from pathlib import Path

import pytest
import yaml
from transformers import ByT5Tokenizer

from pipeline.errors import LangpruneError
from pipeline.evaluate import lm_eval_runner as R
from tests.tiny import tiny_model

ALL_LANGS = ["ar", "de", "en", "es", "ru", "sw", "zh", "fr", "hi", "ja"]


def task_files() -> dict[str, Path]:
    return {p.stem: p for p in R.TASKS_DIR.glob(f"{R.TASK_PREFIX}*.yaml")}


@pytest.fixture(scope="module")
def utils():
    """tasks/utils.py, imported by path as lm-eval does."""
    spec = importlib.util.spec_from_file_location("langprune_task_utils", R.TASKS_DIR / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_bundled_task_runs_offline_on_a_tiny_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = R.run_tasks(tiny_model("llama"), ByT5Tokenizer(), ["sib200", "xnli", "belebele"],
                      ALL_LANGS, limit=2, batch_size=16, device="cpu", max_length=1024)
    files = task_files()
    expected = {name.removeprefix(R.TASK_PREFIX).replace("_", ".", 1) for name in files}
    assert set(out.scores) == expected  # one score per checked-in task file, nothing else
    assert len(expected) == 24
    assert all(0.0 <= v <= 1.0 for v in out.scores.values())
    assert set(out.skipped) == {"xnli.ja", "belebele.ar", "belebele.ru", "belebele.sw",
                                "belebele.hi", "belebele.ja"}
    results = out.results_json
    json.dumps(results)  # JSON-serialisable as logged
    for name in files:
        assert results["versions"][name] == 1.0
        assert results["n-samples"][name]["effective"] == 2
    assert results["configs"]["langprune_belebele_de"]["metric_list"][1]["metric"] == "acc_norm"


def test_checked_in_task_files_match_the_generator(tmp_path):
    written = R.write_task_files(tmp_path)
    assert {p.name for p in written} == {p.name for p in task_files().values()}
    for p in written:
        assert (R.TASKS_DIR / p.name).read_text(encoding="utf-8") == p.read_text(encoding="utf-8")


def test_templates_are_versioned_and_name_their_loader():
    for suite in R.BUNDLED:
        text = (R.TASKS_DIR / f"_{suite}_template_yaml").read_text(encoding="utf-8")
        assert f"custom_dataset: !function utils.load_{suite}" in text
        body = yaml.safe_load(text.replace("!function ", ""))
        assert body["metadata"]["version"] == 1.0
        assert body["output_type"] == "multiple_choice"


def test_suites_expand_per_language_and_report_skips():
    plan = R.validate_tasks(["belebele", "sib200"], ["ar", "de"])
    assert plan.names == ["langprune_belebele_de", "langprune_sib200_ar", "langprune_sib200_de"]
    assert plan.keys["langprune_sib200_ar"] == "sib200.ar"
    assert plan.skipped == ["belebele.ar"]
    assert not plan.needs_defaults
    assert R.validate_tasks(["langprune_xnli_de"], ["en"]).names == ["langprune_xnli_de"]


def test_task_names_are_checked_against_lm_eval_before_work(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # upstream data would come from the cache
    plan = R.validate_tasks(["xnli_de"], ["de"])  # an upstream lm-eval task passes through
    assert plan.names == ["xnli_de"] and plan.needs_defaults
    with pytest.raises(LangpruneError, match=r"unknown task 'sib2000'.*bundled: sib200, xnli, "
                                             r"belebele.*did you mean.*sib200"):
        R.validate_tasks(["sib2000"], ["de"])


def test_lm_eval_tasks_refuse_an_unreachable_hub_at_once(monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as s:  # a closed local port: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY",
                "https_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(LangpruneError, match="xnli_de need their data from the Hugging Face hub"):
        R.validate_tasks(["sib200", "xnli_de"], ["de"])
    assert R.validate_tasks(["sib200"], ["de"]).names == ["langprune_sib200_de"]  # no hub needed


def test_unreachable_task_data_is_one_clear_line():
    with pytest.raises(LangpruneError, match="cannot fetch task data for xnli_de: Couldn't reach"):
        with R._task_data_errors(["xnli_de"]):
            raise ConnectionError("Couldn't reach 'facebook/xnli' on the Hub (offline)")


def test_flatten_scores_keys():
    results = {"results": {
        "langprune_sib200_de": {"alias": "x", "acc,none": 0.5, "acc_stderr,none": "N/A",
                                "acc_norm,none": 0.25},
        "arc_easy": {"acc,none": 0.75, "acc_norm,none": 0.5, "acc_stderr,none": 0.1},
    }}
    scores = R.flatten_scores(results, {"langprune_sib200_de": "sib200.de"})
    assert scores == {"sib200.de": 0.5, "arc_easy.acc": 0.75, "arc_easy.acc_norm": 0.5}


def test_sib200_documents_interleave_topics_in_the_same_order_everywhere(utils):
    en = utils.load_sib200(lang="en")["test"]
    zh = utils.load_sib200(lang="zh", version=1.0)["test"]  # lm-eval also passes metadata
    assert len(en) == 204
    assert len(set(en["category"][:7])) == 7  # any small limit covers every topic
    assert en["index_id"] == zh["index_id"]


def test_belebele_questions_are_parallel_across_languages(utils):
    de, en = utils.load_belebele(lang="de")["test"], utils.load_belebele(lang="en")["test"]
    assert len(de) == len(en) == 900
    assert de["link"] == en["link"]
    assert de["question_number"] == en["question_number"]


def test_xnli_labels_and_prompt_words(utils):
    docs = utils.load_xnli(lang="de")["test"]
    assert set(docs["label"]) == {0, 1, 2}  # entailment, neutral, contradiction
    assert docs[0]["question_word"] == "richtig" and docs[0]["contradiction_word"] == "Nein"


def test_missing_language_data_is_a_clear_error(utils):
    with pytest.raises(LangpruneError, match="no bundled belebele data for language 'ar'"):
        utils.load_belebele(lang="ar")
