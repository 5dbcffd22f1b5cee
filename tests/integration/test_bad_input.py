"""Bad input, table-driven: every case runs the real CLI and must fail early and clearly.

Each case asserts: a non-zero exit, exactly one ``error: ...`` line on stderr that names the
offending value, no traceback, no model weights loaded (the loaders are replaced by a trap
in-process: reaching them fails the case), and no MLflow run that looks successful (the
store is checked after every case). Most cases run in-process through
:func:`jobs.cli.main`; the ones marked ``sub`` also run as ``python -m pipeline``.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from jobs import cli
from pipeline.paths import REPO_ROOT
from tests.servers import free_port

EXPERIMENT = "bad-input"


class HeavyWork(BaseException):
    """Raised by the trapped model loaders: a case reached heavy work before failing."""


@dataclass(frozen=True)
class Case:
    id: str
    argv: list[str]  # command and key=value items; {name} placeholders come from the world
    expect: str  # must appear in the error line (the offending value, formatted)
    env: dict[str, str] = field(default_factory=dict)
    sub: bool = False  # also run as a subprocess
    prepare: str = ""  # name of a World method that breaks something; it returns an undo
    no_run: bool = False  # also: no MLflow run at all was created (the store is untouched)


# Small budgets so that a case that wrongly got through would still be quick.
BASE = ["model={model}", "device=cpu", "n_samples=4", "seq_len=32", "eval_langs=de",
        "eval_tokens=64", "tasks=", f"experiment={EXPERIMENT}", "output_dir={out}"]
SEARCH = ["target_lang=sw", "languages=de,sw", "n_trials=2", "verdict_sets=2",
          "search_eval_tokens=64", "storage=sqlite:///{tmp}/optuna.db"]


def main_(*items: str) -> list[str]:
    return ["main", *BASE, *items]


def search_(*items: str) -> list[str]:
    return ["search", *BASE, *SEARCH, *items]


CASES = [
    # ---- config values (pipeline/config/) -------------------------------------------------
    Case("unknown-calib-language", main_("calib_lang=xx"), "'xx'", sub=True),
    Case("unknown-eval-language", main_("eval_langs=de,qq"), "'qq'"),
    Case("unknown-method", main_("method=wandaa"), "'wandaa'"),
    Case("malformed-pattern", main_("pattern=2-4"), "'2-4'"),
    Case("nm-n-equals-m", main_("pattern=4:4"), "'4:4'"),
    Case("nm-n-above-m", main_("pattern=8:4"), "'8:4'"),
    Case("nm-sparsity-mismatch", main_("pattern=2:4", "sparsity=0.6"), "sparsity=0.6"),
    Case("sparsity-negative", main_("sparsity=-0.1"), "-0.1"),
    Case("sparsity-one", main_("sparsity=1"), "got 1.0"),
    Case("sparsity-nan", main_("sparsity=nan"), "nan", sub=True),
    Case("sparsity-not-a-number", main_("sparsity=half"), "'half'"),
    Case("blend-negative-weight", main_("calib_blend=de:-0.5,en:1.5"), "-0.5"),
    Case("blend-nan-weight", main_("calib_blend=de:nan,en:1"), "nan"),
    Case("blend-all-zero", main_("calib_blend=de:0,en:0"), "de:0,en:0"),
    Case("blend-unknown-language", main_("calib_blend=de:0.5,xx:0.5"), "'xx'"),
    Case("blend-malformed", main_("calib_blend=de"), "'de'"),
    Case("blend-not-summing-to-one", main_("calib_blend=de:0.5,en:0.2"), "0.7"),
    Case("n-samples-zero", main_("n_samples=0"), "got 0"),
    Case("n-samples-not-an-int", main_("n_samples=many"), "'many'"),
    Case("calib-set-negative", main_("calib_set=-1"), "got -1"),
    Case("unknown-device", main_("device=tpu"), "'tpu'"),
    Case("unknown-dtype", main_("dtype=float8"), "'float8'"),
    Case("unknown-config-key", main_("sparsty=0.5"), "'sparsty'"),
    Case("override-without-equals", main_("sparsity"), "'sparsity'"),
    Case("bad-boolean", main_("force=maybe"), "'maybe'"),
    Case("eval-tokens-negative", main_("eval_tokens=-5"), "got -5"),
    Case("missing-config-file", ["main", "--config", "/nonexistent/langprune.yaml"],
         "/nonexistent/langprune.yaml"),
    Case("sweep-unknown-method", ["sweep", *BASE, "sweep_methods=wanda,obs"], "'obs'"),
    Case("analyze-bad-pooling", ["analyze", "lsar_pooling=max"], "'max'"),
    # ---- search (pipeline/search.py) ----------------------------------------------------------
    Case("storage-unknown-scheme", search_("storage=redis://127.0.0.1/0"), "'redis'", sub=True),
    Case("search-unknown-mode", search_("mode=slow"), "'slow'"),
    Case("search-unknown-objective", search_("objective=accuracy"), "'accuracy'"),
    Case("search-method-without-data", search_("method=magnitude"), "magnitude"),
    Case("search-unknown-target", search_("target_lang=xx"), "'xx'"),
    Case("search-language-twice", search_("languages=de,de,sw"), "de,de,sw"),
    Case("search-no-trials", search_("n_trials=0"), "got 0"),
    Case("search-one-verdict-set", search_("verdict_sets=1"), "verdict_sets"),
    Case("search-study-name-quote", search_("study_name=a'b"), "a'b"),
    Case("search-empty-pool", search_("languages=,"), "languages is empty"),
    # ---- model, device, data: checked before the model is loaded (pipeline/jobs.py) ---------
    Case("seq-len-longer-than-model", main_("seq_len=1024"), "seq_len=1024"),
    Case("eval-seq-len-longer-than-model", main_("eval_seq_len=4096"), "eval_seq_len=4096"),
    Case("corpus-too-short", main_("n_samples=5000", "seq_len=256"), "5000 windows"),
    Case("search-corpus-too-short", search_("n_samples=5000", "seq_len=256"), "5000 windows"),
    Case("calib-source-is-eval-text", main_("calib_source=flores"), "'flores'"),
    Case("calib-source-unknown", main_("calib_source=nope"), "'nope'"),
    # only calibration sources are listed (no flores), and nothing unrelated is suggested
    Case("calib-source-unknown-lists-calibration-sources", main_("calib_source=nope"),
         "unknown calibration source 'nope'; calibration sources: mc4 (hub), ntrex, tico19, "
         "tydiqa, wmt"),
    Case("sparsity-zero", main_("sparsity=0"),
         "sparsity=0 prunes nothing; use `dense` for the unpruned baseline", sub=True),
    Case("sweep-sparsity-zero", ["sweep", *BASE, "sparsity=0.0"], "sparsity=0 prunes nothing"),
    Case("search-sparsity-zero", search_("sparsity=0"), "sparsity=0 prunes nothing"),
    Case("missing-model-path", main_("model=/nonexistent/model"), "/nonexistent/model",
         sub=True),
    Case("model-folder-without-config", main_("model={noconfig}"), "no config.json",
         no_run=True),
    # corrupt model files: one line naming the file, before any run exists
    Case("model-gguf-not-gguf", main_("model={not_gguf}"),
         "model file {not_gguf} is not a GGUF file", sub=True, no_run=True),
    Case("dense-model-gguf-not-gguf", ["dense", *BASE, "model={not_gguf}"],
         "{not_gguf} is not a GGUF file", no_run=True),
    Case("model-gguf-unknown-version", main_("model={gguf_v9}"), "GGUF version 9",
         no_run=True),
    Case("model-safetensors-truncated", main_("model={truncated}"),
         "model file {truncated}/model.safetensors is truncated", sub=True, no_run=True),
    Case("model-safetensors-garbage", main_("model={garbage}"),
         "{garbage}/model.safetensors is truncated or not a safetensors file", no_run=True),
    Case("model-shard-missing", main_("model={noshard}"),
         "{noshard}/model-00002-of-00002.safetensors is missing", no_run=True),
    Case("model-unknown-architecture", main_("model={badarch}"), "nosuchmodel"),
    Case("model-without-decoder-layers", main_("model={nolayers}"), "decoder layers"),
    Case("model-with-its-own-code", main_("model={remote_code}"), "trust_remote_code=true"),
    Case("dense-model-without-decoder-layers", ["dense", *BASE, "model={nolayers}"],
         "decoder layers"),
    Case("cuda-without-cuda", main_("device=cuda"), "'cuda'"),
    Case("non-utf8-corpus", main_("calib_lang=de"), "not valid UTF-8",
         env={"LANGPRUNE_DATA": "{bad_utf8}"}, sub=True),
    Case("empty-evaluation-text", main_(), "'sentence' fields are empty",
         env={"LANGPRUNE_DATA": "{empty_eval}"}),
    Case("unwritable-output-dir", main_("output_dir={a_file}/out"), "{a_file}/out"),
    Case("unknown-task", main_("tasks=nosuchtask"), "nosuchtask"),
    Case("unreachable-tracking-uri", main_(), "127.0.0.1:{dead_port}",
         env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:{dead_port}"}, sub=True),
    # ---- mask files (pipeline/masks.py, read by analyze before the model) --------------------
    Case("analyze-corrupt-mask-file", ["analyze", "sweep_run={sweep}"], "mask file",
         prepare="truncate_mask"),
    Case("analyze-mask-checksum-mismatch", ["analyze", "sweep_run={sweep}"], "sha256",
         prepare="flip_mask_bit"),
    # a valid, checksummed mask file that does not fit the model (no model weights loaded)
    Case("analyze-mask-shape-mismatch", ["analyze", "sweep_run={sweep}"],
         "has shape (32, 64), the model's weight has (64, 32)", prepare="transpose_mask"),
    Case("analyze-mask-unknown-module", ["analyze", "sweep_run={sweep}"],
         "'model.layers.9.mlp.up_proj' names no module", prepare="rename_mask"),
    Case("analyze-mask-file-replaced", ["analyze", "sweep_run={sweep}"],
         "the artifact was replaced", prepare="replace_mask"),
    Case("analyze-unknown-sweep", ["analyze", "sweep_run=0123456789abcdef"],
         "0123456789abcdef"),
]


def test_the_table_is_big_and_unique():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)
    assert sum(c.sub for c in CASES) >= 5


# ---- the world the cases run in ----------------------------------------------------------------


def _tiny_model(path: Path, layers: int) -> None:
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = ByT5Tokenizer()
    cfg = LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, bos_token_id=None,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def _data_copy(root: Path, folder: str, lang: str, records: bytes) -> Path:
    """The bundled data folder with one file replaced (everything else linked)."""
    src = REPO_ROOT / "data"
    root.mkdir()
    for item in src.iterdir():
        if item.name != folder:
            (root / item.name).symlink_to(item)
    (root / folder).mkdir()
    for item in (src / folder).iterdir():
        if item.name != f"{lang}.jsonl.gz":
            (root / folder / item.name).symlink_to(item)
    with gzip.open(root / folder / f"{lang}.jsonl.gz", "wb") as f:
        f.write(records)
    return root


class World:
    """Everything the cases point at: models, data folders, a store with one sweep."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.store = f"sqlite:///{tmp / 'mlflow.db'}"
        _tiny_model(tmp / "model", 2)
        _tiny_model(tmp / "nolayers", 0)
        (tmp / "noconfig").mkdir()
        (tmp / "badarch").mkdir()
        (tmp / "badarch" / "config.json").write_text(json.dumps({"model_type": "nosuchmodel"}))
        (tmp / "a_file").write_text("not a folder")
        self._remote_code_model(tmp / "remote_code")
        (tmp / "x.gguf").write_text("a text file, not a model\n")
        (tmp / "v9.gguf").write_bytes(b"GGUF" + (9).to_bytes(4, "little") + bytes(16))
        self._broken_copy(tmp / "model", tmp / "truncated",
                          lambda b: b[: len(b) - 1000])
        self._broken_copy(tmp / "model", tmp / "garbage", lambda b: b"not safetensors" * 10)
        self._broken_copy(tmp / "model", tmp / "noshard", lambda b: b)
        (tmp / "noshard" / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {"a": "model.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}))
        bad = '{"id": 0, "doc_id": "d0", "text": "Gr\xfc\xdfe"}\n'.encode("latin-1")
        _data_copy(tmp / "bad_utf8", "ntrex128", "de", bad)
        empty = "".join(json.dumps({"id": i, "sentence": ""}) + "\n" for i in range(3))
        _data_copy(tmp / "empty_eval", "flores200_devtest", "de", empty.encode())
        self.values = {"tmp": str(tmp), "model": str(tmp / "model"), "out": str(tmp / "out"),
                       "nolayers": str(tmp / "nolayers"), "noconfig": str(tmp / "noconfig"),
                       "badarch": str(tmp / "badarch"), "a_file": str(tmp / "a_file"),
                       "bad_utf8": str(tmp / "bad_utf8"), "empty_eval": str(tmp / "empty_eval"),
                       "dead_port": str(free_port()), "sweep": "",
                       "remote_code": str(tmp / "remote_code"),
                       "not_gguf": str(tmp / "x.gguf"), "gguf_v9": str(tmp / "v9.gguf"),
                       "truncated": str(tmp / "truncated"), "garbage": str(tmp / "garbage"),
                       "noshard": str(tmp / "noshard")}
        self.mask_path: Path | None = None

    @staticmethod
    def _broken_copy(src: Path, dst: Path, change: Callable[[bytes], bytes]) -> None:
        """A copy of the model folder ``src`` whose ``model.safetensors`` is changed."""
        import shutil

        shutil.copytree(src, dst)
        weights = dst / "model.safetensors"
        weights.write_bytes(change(weights.read_bytes()))

    @staticmethod
    def _remote_code_model(folder: Path) -> None:
        """A model folder whose config points at its own Python (never run: no opt-in)."""
        from transformers import ByT5Tokenizer

        folder.mkdir()
        (folder / "evil.py").write_text("raise SystemExit('remote code ran')\n")
        (folder / "config.json").write_text(json.dumps({
            "model_type": "evil", "architectures": ["Evil"],
            "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"}}))
        ByT5Tokenizer().save_pretrained(folder)

    def fill(self, text: str) -> str:
        return text.format(**self.values)

    def env(self, case: Case) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.store, "LANGPRUNE_CACHE": str(self.tmp / "cache"),
                "MLFLOW_DISABLE_TELEMETRY": "true", "LANGPRUNE_LOG_LEVEL": "WARNING",
                **{k: self.fill(v) for k, v in case.env.items()}}

    def make_sweep(self) -> None:
        """One real (tiny) sweep whose member's mask file the mask cases break."""
        argv = ["sweep", *BASE, "sweep_langs=de", "sweep_methods=wanda", "sweep_sets=1"]
        assert cli.main([self.fill(a) for a in argv]) == 0
        client = MlflowClient(self.store)
        exp = client.get_experiment_by_name(EXPERIMENT)
        sweep = client.search_runs([exp.experiment_id], "tags.`langprune.kind` = 'sweep'")[0]
        member = client.search_runs([exp.experiment_id], "tags.`langprune.kind` = 'pruned'")[0]
        self.values["sweep"] = sweep.info.run_id
        self.member_id = member.info.run_id
        from mlflow.utils.file_utils import local_file_uri_to_path

        art = Path(local_file_uri_to_path(member.info.artifact_uri))
        self.mask_path = art / "masks" / "masks.safetensors"
        assert self.mask_path.is_file()

    def _rewrite_mask(self, change: Callable[[bytes], bytes]) -> Callable[[], None]:
        assert self.mask_path is not None
        good = self.mask_path.read_bytes()
        self.mask_path.write_bytes(change(good))
        return lambda: self.mask_path.write_bytes(good)  # type: ignore[union-attr]

    def _rewrite_masks(self, change: Callable[[dict], dict], keep_tag: bool = True,
                       ) -> Callable[[], None]:
        """Write a valid (checksummed) mask file with changed masks; with ``keep_tag`` the
        run's logged sha256 tag is set to the new file's, so only the change is wrong."""
        from pipeline.masks import load_packed, read_metadata, save_masks

        assert self.mask_path is not None
        good = self.mask_path.read_bytes()
        masks = {k: v.unpack() for k, v in load_packed(self.mask_path).items()}
        meta = {k: v for k, v in read_metadata(self.mask_path).items()
                if k in ("config_hash",)}
        sha = save_masks(change(masks), self.mask_path, metadata=meta)
        client = MlflowClient(self.store)
        old_tag = client.get_run(self.member_id).data.tags["langprune.masks_sha256"]
        if keep_tag:
            client.set_tag(self.member_id, "langprune.masks_sha256", sha)

        def undo() -> None:
            self.mask_path.write_bytes(good)  # type: ignore[union-attr]
            client.set_tag(self.member_id, "langprune.masks_sha256", old_tag)

        return undo

    def transpose_mask(self) -> Callable[[], None]:
        name = "model.layers.0.mlp.up_proj"  # (64, 32) in the tiny model
        return self._rewrite_masks(lambda m: {**m, name: m[name].T.contiguous()})

    def rename_mask(self) -> Callable[[], None]:
        def change(m: dict) -> dict:
            m = dict(m)
            m["model.layers.9.mlp.up_proj"] = m.pop("model.layers.0.mlp.up_proj")
            return m
        return self._rewrite_masks(change)

    def replace_mask(self) -> Callable[[], None]:
        name = "model.layers.0.mlp.up_proj"
        return self._rewrite_masks(lambda m: {**m, name: ~m[name]}, keep_tag=False)

    def truncate_mask(self) -> Callable[[], None]:
        return self._rewrite_mask(lambda b: b[: len(b) // 2])

    def flip_mask_bit(self) -> Callable[[], None]:
        # the last byte is mask payload (safetensors: header first, then the data)
        return self._rewrite_mask(lambda b: b[:-1] + bytes([b[-1] ^ 0x01]))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-input")
    w = World(tmp)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in w.env(Case("", [], "")).items():
            mp.setenv(k, v)
        for k in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
            mp.delenv(k, raising=False)
        mp.chdir(tmp)
        saved = dict(os.environ)
        try:
            w.make_sweep()
        finally:
            os.environ.clear()
            os.environ.update(saved)
            mlflow.set_tracking_uri(None)
    return w


def _finished_runs_since(world: World, t0_ms: int) -> list[str]:
    """Runs started since ``t0_ms`` that look successful (FINISHED) in the case's store."""
    client = MlflowClient(world.store)
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, f"attributes.start_time >= {t0_ms}", max_results=1000)
    return [r.info.run_id for r in runs if r.info.status == "FINISHED"]


def _runs_since(world: World, t0_ms: int) -> list[str]:
    """Every run started since ``t0_ms`` in the case's store, whatever its status."""
    client = MlflowClient(world.store)
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, f"attributes.start_time >= {t0_ms}", max_results=1000)
    return [r.info.run_id for r in runs]


def _check_output(case: Case, world: World, rc: int, stderr: str) -> None:
    assert rc != 0, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert world.fill(case.expect) in errors[0], errors[0]


@pytest.fixture
def trapped(monkeypatch):
    """Model loading raises :class:`HeavyWork`: a case must fail before it."""
    import transformers

    import pipeline.loading as loading

    def trap(*args, **kwargs):
        raise HeavyWork("the model was loaded before the error")

    monkeypatch.setattr(loading, "load_model", trap)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", trap)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_in_process(case, world, trapped, monkeypatch, capsys):
    if case.id == "cuda-without-cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for k, v in world.env(case).items():
        monkeypatch.setenv(k, v)
    for k in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(world.tmp)
    undo = getattr(world, case.prepare)() if case.prepare else None
    saved_env, saved_handler = dict(os.environ), signal.getsignal(signal.SIGTERM)
    t0 = int(time.time() * 1000)
    capsys.readouterr()
    try:
        rc = cli.main([world.fill(a) for a in case.argv])
    finally:
        signal.signal(signal.SIGTERM, saved_handler)
        os.environ.clear()
        os.environ.update(saved_env)
        mlflow.set_tracking_uri(None)
        if undo is not None:
            undo()
    _check_output(case, world, rc, capsys.readouterr().err)
    assert _finished_runs_since(world, t0) == []
    if case.no_run:
        assert _runs_since(world, t0) == []


@pytest.mark.parametrize("case", [c for c in CASES if c.sub], ids=[c.id for c in CASES if c.sub])
def test_bad_input_as_a_process(case, world):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **world.env(case)}
    for k in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        env.pop(k, None)
    t0 = int(time.time() * 1000)
    proc = subprocess.run([sys.executable, "-m", "pipeline", *map(world.fill, case.argv)],
                          cwd=world.tmp, env=env, capture_output=True, text=True, timeout=300)
    _check_output(case, world, proc.returncode, proc.stderr)
    assert _finished_runs_since(world, t0) == []



def test_the_trap_catches_a_valid_run(world, trapped, monkeypatch, capsys):
    """Control: a valid config gets past every check and reaches the (trapped) model load,
    so a bad-input case that passes above really failed before loading the model."""
    for k, v in world.env(Case("", [], "")).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(world.tmp)
    saved_env, saved_handler = dict(os.environ), signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(HeavyWork):
            cli.main([world.fill(a) for a in main_("calib_lang=de", "force=true")])
    finally:
        signal.signal(signal.SIGTERM, saved_handler)
        os.environ.clear()
        os.environ.update(saved_env)
        mlflow.set_tracking_uri(None)
    client = MlflowClient(world.store)
    exp = client.get_experiment_by_name(EXPERIMENT)
    newest = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"],
                                max_results=1)[0]
    assert newest.info.status == "FAILED"  # the run that reached the load ended FAILED
