"""MLproject <-> config contract: every entry-point parameter is a config key with the same
default, appears in its command, and really reaches the Config built by the CLI."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import pytest
import tomllib
import yaml
from mlflow.projects._project_spec import load_project

from jobs.cli import build_config
from pipeline.config import COMMAND_DEFAULTS, Config, canonical

ROOT = Path(__file__).resolve().parents[2]
PROJECT = load_project(str(ROOT))

# A non-default, valid value for every key an entry point may expose.
SAMPLE = {
    "sweep_blends": "uniform;*+en",
    "sweep_sparsities": "0.2,0.5",
    "layer_sparsity": "uniform",  # owl needs an unstructured pattern (2:4 below)
    "model": "some/hub-model",
    "method": "sparsegpt",
    "sparsity": "0.5",
    "pattern": "2:4",
    "calib_lang": "zh",
    "calib_blend": "de:0.25,zh:0.75",
    "calib_set": "2",
    "calib_source": "wmt",
    "n_samples": "16",
    "seq_len": "128",
    "eval_langs": "de,sw",
    "eval_tokens": "1000",
    "tasks": "sib200",
    "limit": "3",
    "device": "cpu",
    "dtype": "bfloat16",
    "offload": "true",
    "seed": "7",
    "force": "true",
    "sweep_langs": "de,zh",
    "sweep_methods": "wanda",
    "sweep_sets": "3",
    "sweep_run": "0123456789abcdef",
    "analysis_tokens": "512",
    "analysis_seq_len": "128",
    "lsar_sentences": "24",
    "lsar_pooling": "mean",
    "lape_top_rate": "0.02",
    "lape_filter_quantile": "0.9",
    "report_dir": "my-report",
    "target_lang": "zh",
    "objective": "ppl:0.5,sib200:0.5",
    "languages": "de,en,zh",
    "n_trials": "5",
    "study_name": "s1",
    "storage": "sqlite:///x.db",
    "mode": "exact",
    "enqueue_single": "true",
    "verdict_sets": "4",
    "search_eval_tokens": "256",
}


def _default(key: str, command: str = "") -> str:
    if key in COMMAND_DEFAULTS.get(command, {}):
        return canonical(COMMAND_DEFAULTS[command][key])
    f = Config.keys()[key][1]
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return canonical(value)


@pytest.mark.parametrize("name", sorted(PROJECT._entry_points))
def test_parameters_are_config_keys_with_config_defaults(name):
    ep = PROJECT.get_entry_point(name)
    for key, param in ep.parameters.items():
        assert key in Config.keys(), f"{name}: {key} is not a config key"
        assert str(param.default) == _default(key, name), f"{name}: default of {key} drifted"
        assert f"{key}={{{key}}}" in ep.command, f"{name}: {key} is not passed to the CLI"


@pytest.mark.parametrize("name", sorted(PROJECT._entry_points))
def test_every_parameter_reaches_the_config(name, tmp_path):
    ep = PROJECT.get_entry_point(name)
    user = {k: SAMPLE[k] for k in ep.parameters}
    argv = shlex.split(ep.compute_command(user, str(tmp_path)))
    assert argv[:4] == ["python", "-m", "pipeline", name]
    cfg = build_config(None, argv[4:])
    flat = cfg.to_flat()
    for key, value in user.items():
        assert flat[key] == canonical(Config.from_overrides({key: value}).to_flat()[key])
        assert flat[key] != _default(key, name) or value == _default(key, name)


def test_main_has_the_parameters_researchers_use():
    main = PROJECT.get_entry_point("main").parameters
    need = {"model", "method", "sparsity", "pattern", "calib_lang", "calib_blend", "calib_set",
            "calib_source", "n_samples", "seq_len", "eval_langs", "tasks", "limit", "device",
            "dtype", "seed"}
    assert need <= set(main)
    assert {"main", "dense"} <= set(PROJECT._entry_points)


def test_conda_env_pins_match_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert sorted(pip) == sorted(deps)
    assert all("==" in d for d in deps), "every runtime dependency is pinned"
    assert PROJECT.env_type == "conda_env"


def test_command_defaults_sit_below_user_overrides(tmp_path):
    """The sweep budgets apply only to keys the user leaves unset, on the CLI and in YAML."""
    sweep = build_config(None, [], "sweep")
    assert sweep.eval.eval_tokens == COMMAND_DEFAULTS["sweep"]["eval_tokens"]
    assert sweep.eval.limit == COMMAND_DEFAULTS["sweep"]["limit"]
    assert build_config(None, [], "main").eval.limit == Config().eval.limit
    assert build_config(None, ["limit=16"], "sweep").eval.limit == 16
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("eval_tokens: 4096\n")
    from_yaml = build_config(str(yaml_file), ["limit=2"], "sweep")
    assert (from_yaml.eval.eval_tokens, from_yaml.eval.limit) == (4096, 2)
