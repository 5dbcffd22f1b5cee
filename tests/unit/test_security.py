"""Security: servers bind 127.0.0.1 unless told otherwise, ``trust_remote_code`` stays off,
nothing unpickles what it reads, artifact names from user input cannot escape their folder."""

from __future__ import annotations

import ast
import json
import pickle
import re
from pathlib import Path

import pytest
import torch

from pipeline.config import Config
from pipeline.errors import LangpruneError
from pipeline.paths import REPO_ROOT
from tracking import runs as R

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# ---- servers bind loopback -------------------------------------------------------------------


def _server_commands(text: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", text)  # shell line continuations
    return re.findall(r"\bmlflow (?:server|ui)\b[^\n`]*", joined)


def _hosts(command: str) -> list[str]:
    return re.findall(r"(?:--host|-h)[ =]+['\"]?([^\s'\"]+)", command)


def _readme_sections() -> dict[str, str]:
    text = (REPO_ROOT / "README.md").read_text()
    parts = re.split(r"^(## .*)$", text, flags=re.MULTILINE)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def test_servers_the_project_starts_bind_loopback():
    """Every ``mlflow server``/``ui`` in the README, MLproject, CI and the test helpers binds
    127.0.0.1 (or leaves MLflow's default, 127.0.0.1). The README's multi-machine section is
    the one place that is told otherwise, on purpose."""
    sources = {"MLproject": (REPO_ROOT / "MLproject").read_text(),
               ".ci/run": (REPO_ROOT / ".ci/run").read_text()}
    for heading, body in _readme_sections().items():
        if "at scale" not in heading.lower():
            sources[f"README {heading}"] = body
    commands = {name: _server_commands(text) for name, text in sources.items()}
    assert any(commands.values()), "the README shows how to start the UI"
    for name, found in commands.items():
        for command in found:
            assert set(_hosts(command)) <= LOOPBACK, f"{name}: {command}"
    helpers = (REPO_ROOT / "tests/servers.py").read_text()
    assert '"--host", "127.0.0.1"' in helpers  # the test mlflow server
    if "listen_addresses" in helpers:  # the test PostgreSQL cluster
        assert re.findall(r"listen_addresses=([^\s\"']+)", helpers) == ["127.0.0.1"]
    code = [*REPO_ROOT.glob("pipeline/**/*.py"), *REPO_ROOT.glob("tracking/*.py"),
            REPO_ROOT / "tests/servers.py", REPO_ROOT / "tests/conftest.py"]
    assert [p for p in code if "0.0.0.0" in p.read_text()] == []


# ---- trust_remote_code ---------------------------------------------------------------------


def test_remote_code_is_never_run_unless_asked(tmp_path, monkeypatch):
    """A model folder whose config points at its own Python: loading it with the default
    config refuses, and the folder's code never runs."""
    from transformers import ByT5Tokenizer

    from pipeline.loading import load_model

    marker = tmp_path / "remote-code-ran"
    folder = tmp_path / "evil-model"
    folder.mkdir()
    (folder / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["Evil"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"}}))
    ByT5Tokenizer().save_pretrained(folder)  # a plain tokenizer: the model is what is refused
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = Config.from_overrides({"model": str(folder), "device": "cpu"})
    assert cfg.model.trust_remote_code is False
    with pytest.raises(LangpruneError, match="ships its own Python code.*trust_remote_code=true"):
        load_model(cfg.model)
    assert not marker.exists()


# ---- no pickles ------------------------------------------------------------------------------

_UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"),
               ("dill", "load"), ("dill", "loads"), ("cloudpickle", "load"),
               ("cloudpickle", "loads"), ("joblib", "load"), ("pd", "read_pickle"),
               ("pandas", "read_pickle"), ("shelve", "open"), ("marshal", "loads")}


def _unsafe_calls(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value
        base = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
        name = f"{path.relative_to(REPO_ROOT)}:{node.lineno}"
        kw = {k.arg: k.value for k in node.keywords}
        if (base, node.func.attr) in _UNPICKLERS:
            found.append(f"{name} {base}.{node.func.attr}")
        elif node.func.attr == "load" and base == "torch":
            safe = kw.get("weights_only")
            if not (isinstance(safe, ast.Constant) and safe.value is True):
                found.append(f"{name} torch.load without weights_only=True")
        elif node.func.attr == "load" and base == "np":
            allow = kw.get("allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and not allow.value):
                found.append(f"{name} np.load(allow_pickle=...)")
        elif node.func.attr == "load_model" and "mlflow" in ast.unparse(owner):
            found.append(f"{name} mlflow model flavours unpickle")
    return found


def test_no_code_path_unpickles():
    files = [p for d in ("pipeline", "tracking", "analysis") for p in (REPO_ROOT / d).rglob("*.py")]
    assert len(files) > 20
    assert [hit for p in files for hit in _unsafe_calls(p)] == []


class _Payload:
    """Unpickling this creates ``marker``: proof that a loader ran a pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_mask_and_statistics_files_never_unpickle(tmp_path, writer):
    """A pickle (or a ``torch.save`` zip) put where a mask file or a cached statistics file
    belongs is refused as not-safetensors; its payload never runs."""
    from pipeline.engine.blend import load_stats
    from pipeline.masks import load_masks, read_metadata

    marker = tmp_path / "payload-ran"
    for name in ("masks.safetensors", "stats.safetensors"):
        path = tmp_path / name
        if writer == "pickle":
            path.write_bytes(pickle.dumps({"w": _Payload(marker)}))
        else:
            torch.save({"w": _Payload(marker)}, path)
    with pytest.raises(LangpruneError, match="corrupt or not a mask file"):
        load_masks(tmp_path / "masks.safetensors")
    with pytest.raises(LangpruneError):
        read_metadata(tmp_path / "masks.safetensors")
    assert load_stats(tmp_path / "stats.safetensors", torch.device("cpu")) is None
    assert not marker.exists()


# ---- artifact names --------------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "../x.json", "a/../../x.json", "tables/../../../etc/passwd", "..", "a/..", "/etc/passwd",
    "//server/share/x", "\\\\server\\share\\x", "..\\..\\x.json", "a\\b.json", "C:x.json",
    "c:/windows/x", "a\0b.json", "x.json\0.png", "a\nb.json", "a\x7fb", "", ".", "./", "/",
])
def test_unsafe_artifact_names_are_refused(name):
    with pytest.raises(LangpruneError, match="unsafe artifact name"):
        R.safe_artifact_name(name)


@pytest.mark.parametrize(("name", "clean"), [
    ("config.yaml", "config.yaml"), ("eval/lm_eval_results.json", "eval/lm_eval_results.json"),
    ("./tables//x.csv", "tables/x.csv"), ("sweep/zh-de:0.5.json", "sweep/zh-de:0.5.json"),
    ("a..b/c...json", "a..b/c...json"), ("日本語/ppl.json", "日本語/ppl.json"),
])
def test_safe_artifact_names_stay_inside(name, clean):
    assert R.safe_artifact_name(name) == clean


def test_a_bad_name_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    calls = []

    class Client:
        def log_artifact(self, *args):
            calls.append(args)

    run = R.TrackedRun("run-id", Client())
    for name in ("../escape.json", "/abs.json", "x\0.json"):
        with pytest.raises(LangpruneError, match="unsafe artifact name"):
            run.log_json({"a": 1}, name)
    run.log_json({"a": 1}, "ok/fine.json")
    assert [c[2] for c in calls] == ["ok"]
