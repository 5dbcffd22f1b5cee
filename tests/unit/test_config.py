"""Config: typed overrides, validation before work, one canonical serializer, stable hash."""

from __future__ import annotations

import math

import pytest

from pipeline.config import Config, canonical, format_blend, parse_blend, parse_nm
from pipeline.errors import LangpruneError
from tracking.params import dense_hash, run_name, same_param_value, to_mlflow_params


def test_overrides_are_typed():
    cfg = Config.from_overrides({"sparsity": "0.6", "n_samples": "16", "offload": "yes"})
    assert cfg.prune.sparsity == 0.6 and cfg.calib.n_samples == 16 and cfg.model.offload is True


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"sparsity": "-0.1"}, "[0, 1)"),
        ({"sparsity": "1.0"}, "[0, 1)"),
        ({"sparsity": "nan"}, "sparsity"),
        ({"pattern": "4:2", "sparsity": "0.5"}, "N < M"),
        ({"pattern": "2-4"}, "malformed pattern"),
        ({"pattern": "2:4", "sparsity": "0.6"}, "implies sparsity 0.5"),
        ({"method": "wandaa"}, "did you mean wanda"),
        ({"calib_lang": "xx"}, "unknown language"),
        ({"calib_blend": "de:-0.5,en:1.5"}, ">= 0"),
        ({"calib_blend": "de:nan,en:1"}, "finite"),
        ({"calib_blend": "de:0,en:0"}, "all zero"),
        ({"calib_blend": "de:0.3,en:0.3"}, "sum to 0.6"),
        ({"calib_blend": "de0.5"}, "lang:weight"),
        ({"n_samples": "0"}, "n_samples"),
        ({"n_samples": "1.5"}, "cannot read"),
        ({"dtype": "float8"}, "unknown dtype"),
        ({"device": "tpu"}, "unknown device"),
        ({"calib_lnag": "de"}, "did you mean calib_lang"),
        ({"eval_langs": "de,klingon"}, "unknown language"),
    ],
)
def test_bad_input_is_one_clear_error(overrides, fragment):
    with pytest.raises(LangpruneError) as e:
        Config.from_overrides(overrides)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_blend_normalised_only_when_asked():
    cfg = Config.from_overrides({"calib_blend": "de:1,en:3", "normalize_blend": "true"})
    assert cfg.calib.blend == {"de": 0.25, "en": 0.75}


def test_calib_lang_and_equivalent_blend_hash_the_same():
    a = Config.from_overrides({"calib_lang": "zh"})
    b = Config.from_overrides({"calib_blend": "zh:1.0", "calib_lang": "en"})
    assert a.config_hash() == b.config_hash()
    assert to_mlflow_params(a)["blend"] == "zh:1.0" == to_mlflow_params(b)["blend"]
    assert to_mlflow_params(b)["calib"] == "zh"
    assert to_mlflow_params(b)["calib_lang"] == "en"  # as set; calib_blend overrides it


def test_hash_ignores_execution_only_keys_but_not_science():
    base = Config.from_overrides({})
    assert base.config_hash() == base.replace(force="true", run_name="x").config_hash()
    assert base.config_hash() != base.replace(calib_set="1").config_hash()
    assert dense_hash(base) == dense_hash(base.replace(calib_lang="zh", method="sparsegpt"))
    assert dense_hash(base) != dense_hash(base.replace(eval_tokens="100"))


def test_canonical_strings():
    assert canonical(0.5) == "0.5" and canonical(True) == "true" and canonical(3) == "3"
    assert canonical(math.inf) == "inf"
    params = to_mlflow_params(Config.from_overrides({}))
    assert all(isinstance(v, str) for v in params.values())
    assert list(params) == sorted(params)


def test_yaml_round_trip(tmp_path):
    cfg = Config.from_overrides({"calib_blend": "de:0.5,en:0.5", "pattern": "2:4"})
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert Config.from_yaml(path) == cfg


def test_blend_helpers_and_names():
    assert parse_blend("en:0.25, de:0.75") == {"en": 0.25, "de": 0.75}
    assert format_blend({"en": 0.25, "de": 0.75}) == "de:0.75,en:0.25"
    assert parse_nm("2:4") == (2, 4) and parse_nm("unstructured") == (0, 0)
    cfg = Config.from_overrides({"calib_lang": "zh", "method": "wanda"})
    assert run_name(cfg) == "wanda-0.5-zh-set0"
    assert run_name(cfg.replace(pattern="2:4")) == "wanda-2:4-zh-set0"
    assert run_name(cfg, "dense") == "dense-gemma-3-270m"


def test_params_logged_by_mlflow_run_are_recognised():
    assert same_param_value("calib_blend", "''", "")  # mlflow run shell-quotes empty values
    assert same_param_value("sparsity", "0.50", "0.5")
    assert same_param_value("offload", "False", "false")
    assert not same_param_value("sparsity", "0.6", "0.5")
    assert not same_param_value("calib_lang", "de", "zh")


def test_sweep_grid_has_blend_rows_and_sparsities_in_a_stable_order():
    from jobs.sweep import sweep_cells

    cfg = Config.from_overrides({"sweep_langs": "de,en,sw", "sweep_methods": "wanda",
                                 "sweep_blends": "uniform; *+en; de:0.3,en:0.7",
                                 "sweep_sparsities": "0.2,0.5"})
    cells = sweep_cells(cfg)
    rows = [c.calib.row_label for c in cells]
    assert rows == ["de", "en", "sw", "de+en+sw", "de+en", "en+sw", "de0.3+en0.7"] * 2
    assert [c.prune.sparsity for c in cells] == [0.2] * 7 + [0.5] * 7
    assert cells[3].calib.blend == pytest.approx({"de": 1 / 3, "en": 1 / 3, "sw": 1 / 3})


@pytest.mark.parametrize("overrides,match", [
    ({"sweep_blends": "xx+en"}, "unknown language 'xx'"),
    ({"sweep_blends": "en+en"}, "two or more different languages"),
    ({"sweep_blends": "de:0.5,en:0.6"}, "sum to 1.1"),
    ({"sweep_sparsities": "0.2,1.2"}, r"1.2 is outside \[0, 1\)"),
    ({"sweep_sparsities": "half"}, "not a number"),
])
def test_bad_sweep_rows_and_sparsities_are_one_line_errors(overrides, match):
    with pytest.raises(LangpruneError, match=match) as err:
        Config.from_overrides(overrides)
    assert "\n" not in str(err.value)
