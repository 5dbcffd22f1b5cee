"""Mask overlap (IoU) between pruning masks, computed on bit-packed masks by popcount.

Definitions (docs/science.md#mask-overlap-iou): for one weight matrix pruned in two runs,
IoU = |P_a intersect P_b| / |P_a union P_b| over the *pruned* positions (mask bit = 1).

Masks arrive packed, one module at a time: ``np.packbits(flat_bool_mask, bitorder="little")``
(uint8, padding bits 0), either as bare arrays or as objects with ``.bits`` and ``.shape``
(e.g. ``pipeline.masks.PackedMask``). Intersections and unions are popcounts of ``a & b`` and
``a | b`` on the packed bytes, so no mask is ever unpacked, and at most one module of each
run is touched at a time.

Aggregates (per layer, per module type, overall, per run pair) are pooled, not averaged:
sum of intersections / sum of unions, i.e. the IoU of the concatenated masks. A large
module therefore weighs more than a small one, as it holds more weights.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pipeline.errors import LangpruneError

# Bytes per popcount chunk: bounds the temporaries of ``a & b`` for very large modules.
_CHUNK_BYTES = 1 << 22
# The first ".<int>." in a module name is its decoder-layer index
# (model.layers.3.self_attn.q_proj, gpt_neox.layers.0.mlp..., transformer.h.7.attn...).
_LAYER_RE = re.compile(r"(?:^|\.)(\d+)\.")

PAIR_COLUMNS = [
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
]


@dataclass(frozen=True)
class RunRef:
    """The identity of one pruned run, as needed to pair it with others.

    Attributes:
        run_id: Tracking id of the run (passed to the mask fetcher).
        calib_lang: Calibration language code.
        calib_set: Index of the calibration set of that language.
        method: Pruning method; only runs of the same method are compared.
    """

    run_id: str
    calib_lang: str
    calib_set: int
    method: str


def parse_module_name(name: str) -> tuple[int | None, str]:
    """Split a module name into its decoder-layer index and module type.

    Args:
        name: Full module name, e.g. ``"model.layers.3.self_attn.q_proj"``.

    Returns:
        ``(3, "q_proj")``: the first integer path component (None if there is none, e.g.
        ``lm_head``) and the last path component.
    """
    match = _LAYER_RE.search(name)
    layer = int(match.group(1)) if match else None
    return layer, name.rsplit(".", 1)[-1]


def _bits(mask: Any) -> np.ndarray:
    bits = np.asarray(getattr(mask, "bits", mask))
    if bits.dtype != np.uint8 or bits.ndim != 1:
        raise ValueError(f"packed masks must be 1-D uint8 arrays, got {bits.dtype} {bits.shape}")
    return bits


def _numel(mask: Any) -> int | None:
    """Number of mask entries if ``mask`` carries its shape (a bare array does not)."""
    if hasattr(mask, "bits") and hasattr(mask, "shape"):
        return int(np.prod(mask.shape, dtype=np.int64))
    return None


def packed_intersection_union(a_bits: Any, b_bits: Any) -> tuple[int, int]:
    """Popcounts of the intersection and union of two packed masks of the same size.

    Both masks must have been packed the same way (``bitorder="little"``, zero padding),
    which makes the padding bits contribute nothing.

    Args:
        a_bits: Packed mask (uint8 array, or an object with ``.bits``).
        b_bits: Packed mask of the same weight matrix in another run.

    Returns:
        ``(|A and B|, |A or B|)`` as Python ints.

    Raises:
        ValueError: if the two masks differ in packed size or are not 1-D uint8.
    """
    a, b = _bits(a_bits), _bits(b_bits)
    if a.size != b.size:
        raise ValueError(f"packed masks differ in size: {a.size} vs {b.size} bytes")
    inter = union = 0
    for start in range(0, a.size, _CHUNK_BYTES):
        ca, cb = a[start : start + _CHUNK_BYTES], b[start : start + _CHUNK_BYTES]
        inter += int(np.bitwise_count(ca & cb).sum(dtype=np.int64))
        union += int(np.bitwise_count(ca | cb).sum(dtype=np.int64))
    return inter, union


def mask_iou(a_bits: Any, b_bits: Any) -> float:
    """IoU of the pruned positions of two packed masks.

    Returns:
        |A and B| / |A or B|; NaN when neither mask prunes anything (overlap undefined).
    """
    inter, union = packed_intersection_union(a_bits, b_bits)
    return inter / union if union else math.nan


def random_iou_baseline(s: float, s_b: float | None = None) -> float:
    """Expected IoU of two independent uniformly random masks.

    With sparsities ``s`` and ``s_b`` the expected intersection is ``s * s_b`` and the union
    ``s + s_b - s * s_b`` (per weight), so IoU = s s_b / (s + s_b - s s_b); for equal
    sparsities this is ``s / (2 - s)`` (1/3 at 50%).

    Args:
        s: Sparsity of the first mask, in [0, 1].
        s_b: Sparsity of the second mask; defaults to ``s``.

    Returns:
        The baseline IoU; NaN when both sparsities are 0.
    """
    s_b = s if s_b is None else s_b
    for value in (s, s_b):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"sparsity must lie in [0, 1], got {value}")
    union = s + s_b - s * s_b
    return s * s_b / union if union else math.nan


def iou_table(
    masks_a: Mapping[str, Any], masks_b: Mapping[str, Any], *, progress: bool = False
) -> pd.DataFrame:
    """Per-module IoU between two runs of the same model.

    Modules are read one at a time from both mappings, so lazily loading mappings keep
    memory at one module per run.

    Args:
        masks_a: Module name -> packed mask of run a.
        masks_b: Module name -> packed mask of run b (same module names).
        progress: Show a tqdm bar over modules.

    Returns:
        One row per module, in sorted name order, with columns ``module``, ``layer``
        (nullable Int64; NA for modules outside decoder layers), ``module_type``,
        ``intersection``, ``union``, ``iou``, ``pruned_a``, ``pruned_b`` and ``numel``
        (NA unless the masks carry their shapes).

    Raises:
        LangpruneError: if the runs do not mask the same modules.
    """
    names_a, names_b = set(masks_a), set(masks_b)
    if names_a != names_b:
        diff = sorted(names_a ^ names_b)
        raise LangpruneError(
            f"the two runs mask different modules ({len(diff)} differ, e.g. {diff[:3]}); "
            "IoU needs two runs of the same model"
        )
    rows = []
    for name in tqdm(sorted(names_a), desc="iou", disable=not progress, leave=False):
        ma, mb = masks_a[name], masks_b[name]
        inter, union = packed_intersection_union(ma, mb)
        layer, module_type = parse_module_name(name)
        rows.append(
            {
                "module": name,
                "layer": layer,
                "module_type": module_type,
                "intersection": inter,
                "union": union,
                "iou": inter / union if union else math.nan,
                "pruned_a": int(np.bitwise_count(_bits(ma)).sum(dtype=np.int64)),
                "pruned_b": int(np.bitwise_count(_bits(mb)).sum(dtype=np.int64)),
                "numel": _numel(ma),
            }
        )
    table = pd.DataFrame(
        rows,
        columns=[
            "module",
            "layer",
            "module_type",
            "intersection",
            "union",
            "iou",
            "pruned_a",
            "pruned_b",
            "numel",
        ],
    )
    return table.astype({"layer": "Int64", "numel": "Int64"})


def aggregate_iou(table: pd.DataFrame, by: str | Sequence[str] = "layer") -> pd.DataFrame:
    """Pool a per-module IoU table by a column (default: per decoder layer).

    Args:
        table: Output of :func:`iou_table` (needs ``intersection`` and ``union`` columns).
        by: Column(s) to group by, e.g. ``"layer"`` or ``"module_type"``.

    Returns:
        One row per group with ``intersection``, ``union`` and ``iou`` = sum of
        intersections / sum of unions over the group's modules.
    """
    keys = [by] if isinstance(by, str) else list(by)
    grouped = table.groupby(keys, sort=True, dropna=False)[["intersection", "union"]].sum()
    grouped = grouped.reset_index()
    grouped["iou"] = [
        i / u if u else math.nan for i, u in zip(grouped["intersection"], grouped["union"])
    ]
    return grouped


def overall_iou(table: pd.DataFrame) -> float:
    """IoU over all modules of a table: sum of intersections / sum of unions."""
    inter, union = int(table["intersection"].sum()), int(table["union"].sum())
    return inter / union if union else math.nan


def _pair_sums(
    fetched: Mapping[str, Mapping[str, Any]], pairs: Sequence[tuple[str, str]], progress: bool
) -> dict[tuple[str, str], list[int]]:
    """Sum intersections and unions per pair, walking modules in the outer loop."""
    run_ids = sorted({r for pair in pairs for r in pair})
    names = sorted(fetched[run_ids[0]]) if run_ids else []
    for run_id in run_ids:
        if set(fetched[run_id]) != set(names):
            raise LangpruneError(
                f"run {run_id} masks different modules than run {run_ids[0]}; "
                "IoU needs runs of the same model"
            )
    sums = {pair: [0, 0] for pair in pairs}
    for name in tqdm(names, desc="pairwise iou", disable=not progress, leave=False):
        # One module of every run at a time: lazy mappings never hold a whole model.
        current = {run_id: _bits(fetched[run_id][name]) for run_id in run_ids}
        for pair in pairs:
            inter, union = packed_intersection_union(current[pair[0]], current[pair[1]])
            sums[pair][0] += inter
            sums[pair][1] += union
    return sums


def pairwise_iou(
    runs: Sequence[RunRef], fetch: Callable[[str], Mapping[str, Any]], *, progress: bool = False
) -> pd.DataFrame:
    """Overall IoU of every pair of runs that share a pruning method.

    Args:
        runs: The runs to compare (all of the same model).
        fetch: Run id -> mapping of module name -> packed mask. It is called once per run and
            the mappings are kept while modules are walked one at a time, so for large
            models it should return a lazy mapping (reading a module on access).
        progress: Show a tqdm bar over modules.

    Returns:
        One row per unordered pair (same method), columns :data:`PAIR_COLUMNS`; ``iou`` is
        pooled over all modules.
    """
    by_id = {run.run_id: run for run in runs}
    if len(by_id) != len(runs):
        raise LangpruneError("pairwise_iou got the same run id twice")
    ordered = sorted(runs, key=lambda r: (r.method, r.calib_lang, r.calib_set, r.run_id))
    pairs = [
        (a.run_id, b.run_id) for a, b in itertools.combinations(ordered, 2) if a.method == b.method
    ]
    fetched = {run_id: fetch(run_id) for run_id in sorted({r for p in pairs for r in p})}
    sums = _pair_sums(fetched, pairs, progress)
    rows = []
    for id_a, id_b in pairs:
        a, b = by_id[id_a], by_id[id_b]
        inter, union = sums[(id_a, id_b)]
        rows.append(
            [
                a.method,
                id_a,
                id_b,
                a.calib_lang,
                b.calib_lang,
                a.calib_set,
                b.calib_set,
                inter,
                union,
                inter / union if union else math.nan,
            ]
        )
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def language_iou_matrix(
    pairs: pd.DataFrame, method: str | None = None, languages: Iterable[str] | None = None
) -> pd.DataFrame:
    """Language x language IoU matrix from pairwise run IoUs.

    The diagonal is the mean *intra-language* IoU (pairs of the same language with different
    ``calib_set``); off-diagonal cells are the mean *inter-language* IoU over all pairs of
    runs of the two languages (every combination of their calibration sets). Means are over
    pairs of each pair's pooled IoU. Cells without any pair are NaN (e.g. the diagonal when a
    language has a single calibration set).

    Args:
        pairs: Output of :func:`pairwise_iou` (columns :data:`PAIR_COLUMNS`).
        method: Keep only this method's pairs; required when ``pairs`` mixes methods.
        languages: Row/column order; defaults to the sorted languages present.

    Returns:
        A symmetric DataFrame indexed and columned by language.
    """
    frame = pairs if method is None else pairs[pairs["method"] == method]
    methods = sorted(set(frame["method"]))
    if len(methods) > 1:
        raise LangpruneError(f"pairs mix methods {methods}; pass method=")
    same_lang = frame["lang_a"] == frame["lang_b"]
    # Same language and same set would be a rerun of one configuration, not a comparison.
    frame = frame[~same_lang | (frame["set_a"] != frame["set_b"])]
    langs = (
        list(languages)
        if languages is not None
        else sorted(set(frame["lang_a"]) | set(frame["lang_b"]))
    )
    matrix = pd.DataFrame(np.nan, index=langs, columns=langs, dtype=float)
    matrix.index.name, matrix.columns.name = "lang_a", "lang_b"
    # A pair (a, b) and a pair (b, a) belong to the same cell: key pairs by the sorted languages.
    lo = pd.Series(
        [min(a, b) for a, b in zip(frame["lang_a"], frame["lang_b"])],
        index=frame.index,
        dtype=object,
    )
    hi = pd.Series(
        [max(a, b) for a, b in zip(frame["lang_a"], frame["lang_b"])],
        index=frame.index,
        dtype=object,
    )
    for (la, lb), values in frame["iou"].groupby([lo, hi], sort=True):
        if la in matrix.index and lb in matrix.index:
            matrix.loc[la, lb] = matrix.loc[lb, la] = float(values.mean())
    return matrix


def intra_inter_summary(pairs: pd.DataFrame) -> pd.DataFrame:
    """Mean intra-language and inter-language IoU per method.

    Returns:
        One row per method with ``intra`` (mean over same-language, different-set pairs),
        ``inter`` (mean over different-language pairs), ``n_intra`` and ``n_inter``.
    """
    rows = []
    for method, group in pairs.groupby("method", sort=True):
        same = group["lang_a"] == group["lang_b"]
        intra = group[same & (group["set_a"] != group["set_b"])]["iou"]
        inter = group[~same]["iou"]
        rows.append(
            {
                "method": method,
                "intra": float(intra.mean()) if len(intra) else math.nan,
                "inter": float(inter.mean()) if len(inter) else math.nan,
                "n_intra": len(intra),
                "n_inter": len(inter),
            }
        )
    return pd.DataFrame(rows, columns=["method", "intra", "inter", "n_intra", "n_inter"])
