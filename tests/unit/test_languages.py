"""Language registry: entries match the bundled files, upstream task names exist, and
unknown codes get useful suggestions."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from pipeline.config import REQUIRED_LANGS, Config
from pipeline.data import languages
from pipeline.data.documents import DATASET_DIRS
from pipeline.errors import LangpruneError
from pipeline.paths import data_dir


def test_required_languages_present_and_match_config():
    assert languages.REQUIRED == ("ar", "de", "en", "es", "ru", "sw", "zh")
    assert tuple(REQUIRED_LANGS) == languages.REQUIRED
    codes = languages.language_codes()
    assert set(languages.REQUIRED) <= set(codes)
    assert {"fr", "hi", "ja"} <= set(codes)
    assert [lang.code for lang in languages.all_languages()] == sorted(codes)
    assert all(languages.get_language(c).required for c in languages.REQUIRED)
    assert not languages.get_language("fr").required


@pytest.mark.parametrize("code", languages.REQUIRED)
def test_required_languages_have_default_roles(code):
    lang = languages.get_language(code)
    assert "ntrex" in lang.calibration_sources  # default calibration source
    assert "flores" in lang.eval_sources  # perplexity / LSAR / LAPE text
    assert {"sib200", "xnli"} <= set(lang.tasks)  # the issue: SIB-200 and XNLI for all seven


def test_belebele_languages_are_the_bundled_five():
    have = {lang.code for lang in languages.all_languages() if "belebele" in lang.tasks}
    assert have == {"de", "en", "es", "zh", "fr"}


@pytest.mark.parametrize("lang", languages.all_languages(), ids=lambda lang: lang.code)
def test_entry_is_consistent(lang):
    assert re.fullmatch(r"[a-z]{3}_[A-Z][a-z]{3}", lang.flores_code)
    assert lang.flores_code.split("_")[1] == lang.script
    assert lang.name and lang.name[0].isupper()
    assert lang.hub["mc4"] == lang.code
    assert lang.hub["belebele"] == lang.flores_code
    assert lang.bundled_tasks == tuple(f"langprune_{t}_{lang.code}" for t in lang.tasks)


def _bundled_langs(name: str) -> set[str]:
    folder = data_dir() / DATASET_DIRS[name]
    return {p.name.split(".")[0] for p in folder.glob("*.jsonl*")}


@pytest.mark.parametrize("name", sorted(DATASET_DIRS))
def test_registry_matches_bundled_files(name):
    """A language lists a bundled source exactly when its data file exists."""
    role = next(r for r, names in languages._ROLES.items() if name in names)
    listed = {lang.code for lang in languages.all_languages() if name in lang.sources[role]}
    assert listed == _bundled_langs(name)


def test_role_names_match_source_registry():
    from pipeline.data.sources import SOURCES

    for name in languages.CALIBRATION_SOURCES:
        assert SOURCES.get(name).role == "calibration" and not SOURCES.get(name).hub
    for name in languages.EVAL_SOURCES:
        assert SOURCES.get(name).role == "eval" and not SOURCES.get(name).hub
    assert set(DATASET_DIRS) == set(
        languages.CALIBRATION_SOURCES + languages.EVAL_SOURCES + languages.TASKS
    )


def _upstream_task_names() -> set[str]:
    """Task names declared in lm-eval's bundled YAMLs (found without importing lm_eval)."""
    spec = importlib.util.find_spec("lm_eval")
    assert spec and spec.origin
    names: set[str] = set()
    pattern = re.compile(r"^task:\s*([\w\-.]+)\s*$", re.M)
    for path in Path(spec.origin).parent.joinpath("tasks").rglob("*.yaml"):
        names.update(pattern.findall(path.read_text(encoding="utf-8", errors="replace")))
    return names


def test_upstream_lm_eval_task_names_exist():
    known = _upstream_task_names()
    missing = {
        lang.code: [t for t in lang.lm_eval_tasks if t not in known]
        for lang in languages.all_languages()
    }
    assert not {k: v for k, v in missing.items() if v}, missing
    for lang in languages.all_languages():
        if "xnli" in lang.tasks:
            assert f"xnli_{lang.code}" in lang.lm_eval_tasks
        assert f"belebele_{lang.flores_code}" in lang.lm_eval_tasks


@pytest.mark.parametrize(
    "query, hint",
    [
        ("german", "did you mean de (German)"),
        ("DE", "did you mean de (German)"),
        ("Chinese", "did you mean zh (Chinese)"),
        ("swahilli", "sw (Swahili)"),
        ("deu_Latn", "did you mean de (German)"),
        ("cmn", "did you mean zh (Chinese)"),
    ],
)
def test_unknown_code_suggests_nearest(query, hint):
    with pytest.raises(LangpruneError, match=re.escape(hint)) as err:
        languages.get_language(query)
    assert f"unknown language {query!r}" in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_code_without_close_match_lists_known():
    with pytest.raises(LangpruneError, match="known: ar, de, en") as err:
        languages.get_language("qqq")
    assert "did you mean" not in str(err.value)


def test_config_validates_languages_through_registry():
    with pytest.raises(LangpruneError, match=r"did you mean de \(German\)"):
        Config.from_overrides({"calib_lang": "german"})
    assert Config.from_overrides({"calib_lang": "fr"}).calib.blend == {"fr": 1.0}


def test_task_name_and_missing_task():
    assert languages.get_language("zh").task_name("belebele") == "langprune_belebele_zh"
    with pytest.raises(LangpruneError, match="languages with belebele: de, en, es, fr, zh"):
        languages.get_language("sw").task_name("belebele")
