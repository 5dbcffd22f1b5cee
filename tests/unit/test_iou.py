"""Mask IoU on packed masks: hand-computed cases, packed vs unpacked, random baseline, pairs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from analysis.iou import (
    RunRef,
    aggregate_iou,
    intra_inter_summary,
    iou_table,
    language_iou_matrix,
    mask_iou,
    overall_iou,
    packed_intersection_union,
    pairwise_iou,
    parse_module_name,
    random_iou_baseline,
)
from pipeline.errors import LangpruneError


def pack(mask) -> np.ndarray:
    return np.packbits(np.asarray(mask, dtype=bool).reshape(-1), bitorder="little")


@dataclass(frozen=True, eq=False)
class Packed:  # the duck type of pipeline.masks.PackedMask, without depending on it
    bits: np.ndarray
    shape: tuple[int, ...]


def test_hand_computed_intersection_union():
    a = [1, 1, 0, 0, 1]
    b = [1, 0, 1, 0, 1]
    # pruned a = {0,1,4}, b = {0,2,4}: intersection {0,4}, union {0,1,2,4}
    assert packed_intersection_union(pack(a), pack(b)) == (2, 4)
    assert mask_iou(pack(a), pack(b)) == pytest.approx(0.5)


def test_identical_disjoint_and_empty_masks():
    a = [1, 0, 1, 0, 1, 0, 1, 0, 1]
    assert mask_iou(pack(a), pack(a)) == 1.0
    assert mask_iou(pack(a), pack([1 - v for v in a])) == 0.0
    assert math.isnan(mask_iou(pack([0] * 9), pack([0] * 9)))


@pytest.mark.parametrize("numel", [1, 7, 8, 13, 64, 1001])
def test_packed_agrees_with_unpacked(numel):
    rng = np.random.default_rng(numel)
    a = rng.random(numel) < 0.4
    b = rng.random(numel) < 0.6
    inter, union = packed_intersection_union(pack(a), pack(b))
    assert inter == int((a & b).sum())
    assert union == int((a | b).sum())


def test_size_mismatch_raises():
    with pytest.raises(ValueError):
        packed_intersection_union(pack([1] * 16), pack([1] * 8))


def test_random_masks_overlap_at_baseline():
    rng = np.random.default_rng(0)
    for s in (0.2, 0.5, 0.7):
        a = rng.random(400_000) < s
        b = rng.random(400_000) < s
        assert mask_iou(pack(a), pack(b)) == pytest.approx(random_iou_baseline(s), abs=0.005)
    assert random_iou_baseline(0.5) == pytest.approx(1 / 3)
    assert random_iou_baseline(0.3, 0.6) == pytest.approx(0.18 / (0.9 - 0.18))


def test_parse_module_name():
    assert parse_module_name("model.layers.3.self_attn.q_proj") == (3, "q_proj")
    assert parse_module_name("gpt_neox.layers.12.mlp.dense_4h_to_h") == (12, "dense_4h_to_h")
    assert parse_module_name("lm_head") == (None, "lm_head")


def _model_masks(rng, s, shapes):
    return {name: Packed(pack(rng.random(shape) < s), shape) for name, shape in shapes.items()}


SHAPES = {
    "model.layers.0.mlp.up_proj": (6, 5),
    "model.layers.0.self_attn.q_proj": (3, 3),
    "model.layers.1.mlp.up_proj": (6, 5),
    "model.layers.1.self_attn.q_proj": (3, 3),
}


def test_iou_table_and_pooled_aggregates():
    a = {
        "model.layers.0.q": pack([1, 1, 0, 0]),
        "model.layers.0.k": pack([1] * 8),
        "model.layers.1.q": pack([1, 0, 0, 0]),
    }
    b = {
        "model.layers.0.q": pack([1, 0, 1, 0]),
        "model.layers.0.k": pack([1] * 8),
        "model.layers.1.q": pack([0, 1, 0, 0]),
    }
    table = iou_table(a, b)
    assert list(table["module"]) == sorted(a)
    row = table.set_index("module").loc["model.layers.0.q"]
    assert (row["intersection"], row["union"], row["iou"]) == (1, 3, pytest.approx(1 / 3))
    by_layer = aggregate_iou(table).set_index("layer")
    # pooled: layer 0 = (1 + 8) / (3 + 8), not the mean of 1/3 and 1
    assert by_layer.loc[0, "iou"] == pytest.approx(9 / 11)
    assert by_layer.loc[1, "iou"] == 0.0
    assert overall_iou(table) == pytest.approx(9 / 13)
    assert table["numel"].isna().all()  # bare arrays carry no shape


def test_iou_table_reads_shapes_and_rejects_other_models():
    rng = np.random.default_rng(1)
    a, b = _model_masks(rng, 0.5, SHAPES), _model_masks(rng, 0.5, SHAPES)
    table = iou_table(a, b)
    assert list(table["numel"]) == [30, 9, 30, 9]
    assert set(aggregate_iou(table, "module_type")["module_type"]) == {"up_proj", "q_proj"}
    del b["model.layers.1.mlp.up_proj"]
    with pytest.raises(LangpruneError, match="different modules"):
        iou_table(a, b)


def _planted_runs():
    """Runs whose masks differ from a per-language base by a few flipped bits per set."""
    rng = np.random.default_rng(2)
    numel = 4000
    base = {lang: rng.random(numel) < 0.5 for lang in ("de", "en", "zh")}
    runs, masks = [], {}
    for lang, lang_base in base.items():
        for calib_set in (0, 1):
            for method in ("wanda", "sparsegpt"):
                run_id = f"{method}-{lang}-{calib_set}"
                flip = rng.random(numel) < 0.05
                masks[run_id] = {"model.layers.0.mlp.up_proj": pack(lang_base ^ flip)}
                runs.append(RunRef(run_id, lang, calib_set, method))
    return runs, masks


def test_pairwise_iou_matrix_separates_intra_and_inter():
    runs, masks = _planted_runs()
    fetched = []
    pairs = pairwise_iou(runs, lambda run_id: fetched.append(run_id) or masks[run_id])
    assert sorted(fetched) == sorted(masks)  # each run fetched once
    assert set(pairs["method"]) == {"wanda", "sparsegpt"}
    assert len(pairs) == 2 * (6 * 5 // 2)  # pairs only within a method
    with pytest.raises(LangpruneError, match="mix methods"):
        language_iou_matrix(pairs)
    matrix = language_iou_matrix(pairs, method="wanda")
    assert list(matrix.index) == ["de", "en", "zh"]
    assert np.allclose(matrix.to_numpy(), matrix.to_numpy().T)
    diag = np.diag(matrix.to_numpy())
    off = matrix.to_numpy()[~np.eye(3, dtype=bool)]
    assert diag.min() > 0.8  # same base, 5% flips each
    assert off.max() < 0.4 and off.min() > 0.28  # independent bases: about 1/3
    # diagonal cell = the one intra pair's IoU, recomputed directly
    a, b = masks["wanda-en-0"], masks["wanda-en-1"]
    direct = mask_iou(a["model.layers.0.mlp.up_proj"], b["model.layers.0.mlp.up_proj"])
    assert matrix.loc["en", "en"] == pytest.approx(direct)
    summary = intra_inter_summary(pairs).set_index("method")
    assert summary.loc["wanda", "n_intra"] == 3 and summary.loc["wanda", "n_inter"] == 12
    assert summary.loc["wanda", "intra"] > summary.loc["wanda", "inter"]


def test_language_matrix_single_set_has_nan_diagonal():
    pairs = pd.DataFrame(
        [["wanda", "r1", "r2", "de", "en", 0, 0, 1, 4, 0.25]],
        columns=[
            "method",
            "run_a",
            "run_b",
            "lang_a",
            "lang_b",
            "set_a",
            "set_b",
            "intersection",
            "union",
            "iou",
        ],
    )
    matrix = language_iou_matrix(pairs)
    assert matrix.loc["de", "en"] == matrix.loc["en", "de"] == 0.25
    assert math.isnan(matrix.loc["de", "de"])
