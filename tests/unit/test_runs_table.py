"""Sweep members are labelled by their resolved calibration blend (no tracking server)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tracking import runs_table as RT


def _run(params: dict[str, str]) -> SimpleNamespace:
    return SimpleNamespace(data=SimpleNamespace(params=params, tags={}))


@pytest.fixture
def store(monkeypatch):
    """A fake store: a sweep parent whose member was started with calib_blend=zh:1."""
    runs = {
        "p": _run({}),
        # reused run of the zh cell: the raw calib_lang param is the default, en
        "r1": _run({"method": "wanda", "calib_lang": "en", "calib_blend": "zh:1",
                    "blend": "zh:1.0", "calib": "zh", "calib_set": "0", "sparsity": "0.5"}),
        # an old run that logged neither blend nor calib
        "r2": _run({"method": "wanda", "calib_lang": "en", "calib_set": "0"}),
    }
    record = {"dense_run": "d", "members": [
        {"run_id": "r1", "status": "ok", "method": "wanda", "calib_lang": "zh", "row": "zh"},
        {"run_id": "r2", "status": "ok", "method": "wanda"},
    ]}
    monkeypatch.setattr(RT.R, "client", lambda: SimpleNamespace(get_run=runs.__getitem__))
    monkeypatch.setattr(RT, "read_json_artifact", lambda run_id, path: record)


def test_a_blend_started_run_is_labelled_by_its_blend_not_the_raw_param(store):
    sweep = RT.load_sweep("p")
    labels = {m.run_id: m.calib_lang for m in sweep.members}
    assert labels == {"r1": "zh", "r2": "en"}
    assert {m.run_id: m.sparsity for m in sweep.members}["r1"] == 0.5


def test_member_label_prefers_the_row_then_the_resolved_label():
    params = {"calib_lang": "en", "calib": "de:0.5,en:0.5"}
    assert RT.member_label({"row": "de+en"}, params) == "de+en"
    assert RT.member_label({}, params) == "de:0.5,en:0.5"
    assert RT.member_label({"calib_lang": "zh"}, {"calib_lang": "en"}) == "zh"
    assert RT.member_label({}, {"calib_lang": "en"}) == "en"
