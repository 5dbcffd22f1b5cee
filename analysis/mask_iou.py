"""Mask IoU over a sweep's packed mask files: per-pair tables, language matrices, plots.

Masks are read one module at a time from the packed files (popcount IoU,
:mod:`analysis.iou`), so a sweep's masks never sit in memory together.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors import safe_open
from tqdm.auto import tqdm

from analysis import iou as I
from analysis import plots
from analysis.keys import SweepRun
from analysis.report_tables import Group
from pipeline.masks import PackedMask, read_metadata


class LazyPackedMasks(Mapping[str, PackedMask]):
    """A run's packed masks read one module at a time.

    The file's format and checksum are not verified again here: the caller verifies every
    file first (``jobs.analyze.check_mask_files``).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = str(path)
        shapes = json.loads(read_metadata(path)["shapes"])
        self._shapes = {name: tuple(shape) for name, shape in shapes.items()}

    def __getitem__(self, name: str) -> PackedMask:
        if name not in self._shapes:
            raise KeyError(name)
        with safe_open(self._path, framework="np") as f:
            return PackedMask(f.get_tensor(name), self._shapes[name])

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._shapes))

    def __len__(self) -> int:
        return len(self._shapes)


_PAIR_KEYS = ["method", "run_a", "run_b", "lang_a", "lang_b", "set_a", "set_b"]


def pair_tables(
    pairs: pd.DataFrame, masks: Mapping[str, Mapping[str, PackedMask]], progress: bool
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Per pair: per-module, per-layer and per-module-type IoU tables, concatenated."""
    modules: list[pd.DataFrame] = []
    layers: list[pd.DataFrame] = []
    types: list[pd.DataFrame] = []
    rows = pairs[_PAIR_KEYS].to_dict("records")
    for pair in tqdm(rows, desc="iou tables", disable=not progress, leave=False):
        table = I.iou_table(masks[pair["run_a"]], masks[pair["run_b"]])
        for frame, out in ((table, modules), (I.aggregate_iou(table, "layer"), layers),
                           (I.aggregate_iou(table, "module_type"), types)):
            out.append(frame.assign(**pair)[_PAIR_KEYS + [c for c in frame.columns]])
    return pd.concat(modules, ignore_index=True), pd.concat(layers, ignore_index=True), \
        pd.concat(types, ignore_index=True)


def intra_inter_by_layer(layers: pd.DataFrame) -> pd.DataFrame:
    """Mean IoU per method, kind (intra / inter) and layer over the pairs of that kind."""
    same = layers["lang_a"] == layers["lang_b"]
    kind = np.where(same, "intra", "inter")
    keep = ~same | (layers["set_a"] != layers["set_b"])
    frame = layers.assign(kind=kind)[keep]
    out = frame.groupby(["method", "kind", "layer"], sort=True)["iou"].mean().reset_index()
    return out[["method", "kind", "layer", "iou"]]


def iou_groups(members: Sequence[SweepRun]) -> tuple[dict[str, str], dict[str, float]]:
    """The runs whose masks are compared: the report's matrix groups (:class:`Group`, one
    per method, or per method and sparsity where a method has several), so that names match
    (``wanda``, ``wanda_s0.5``). Returns ``(group name by run id, sparsity by group)``."""
    by_method: dict[str, set[float]] = {}
    for m in members:
        by_method.setdefault(m.method, set()).add(float(m.params.get("sparsity", "nan")))
    names: dict[str, str] = {}
    sparsity: dict[str, float] = {}
    for m in members:
        s = float(m.params.get("sparsity", "nan"))
        group = Group(m.method, s if len(by_method[m.method]) > 1 else None)
        names[m.run_id], sparsity[group.name] = group.name, s
    return names, sparsity


def write_iou(
    members: Sequence[SweepRun], mask_paths: Mapping[str, Path], folder: Path,
    *, progress: bool = False,
) -> dict[str, float] | None:
    """Pairwise mask IoU of runs of one method and sparsity (:func:`iou_groups`): tables,
    matrices and plots into ``folder``; the ``method`` column holds the group's name.

    ``mask_paths`` (run id -> packed mask file) must have been verified (format, checksum).

    Returns:
        The headline metrics (``iou.intra.<group>``, ``iou.inter.<group>``, the random
        baselines), or None when no two runs share a group (nothing written).
    """
    names, sparsity = iou_groups(members)
    refs = [I.RunRef(m.run_id, m.calib_lang, m.calib_set, names[m.run_id]) for m in members]
    masks = {m.run_id: LazyPackedMasks(mask_paths[m.run_id]) for m in members}
    pairs = I.pairwise_iou(refs, masks.__getitem__, progress=progress)
    if pairs.empty:
        return None
    modules, layers, types = pair_tables(pairs, masks, progress)
    summary = I.intra_inter_summary(pairs)
    by_layer = intra_inter_by_layer(layers)
    for name, frame in (("pairs", pairs), ("modules", modules), ("layers", layers),
                        ("module_types", types), ("summary", summary),
                        ("layers_summary", by_layer)):
        frame.to_csv(folder / f"{name}.csv", index=False)
    for method in sorted(set(pairs["method"])):
        _iou_method_files(folder, pairs, by_layer, method, sparsity[method])
    return iou_metrics(summary, sparsity)


def iou_metrics(summary: pd.DataFrame, sparsity: Mapping[str, float]) -> dict[str, float]:
    """Intra / inter IoU and the random baseline s/(2-s) per method (and overall if one s)."""
    metrics: dict[str, float] = {}
    for row in summary.itertuples():
        metrics[f"iou.intra.{row.method}"] = row.intra
        metrics[f"iou.inter.{row.method}"] = row.inter
        metrics[f"iou.random_baseline.{row.method}"] = I.random_iou_baseline(sparsity[row.method])
    if len(set(sparsity.values())) == 1:
        metrics["iou.random_baseline"] = I.random_iou_baseline(next(iter(sparsity.values())))
    return metrics


def _iou_method_files(
    folder: Path, pairs: pd.DataFrame, by_layer: pd.DataFrame, method: str, sparsity: float
) -> None:
    matrix = I.language_iou_matrix(pairs, method)
    matrix.to_csv(folder / f"matrix_{method}.csv")
    plots.iou_heatmap(matrix, folder / f"heatmap_{method}.png", sparsity=sparsity,
                      title=f"mask IoU, {method}")
    rows = by_layer[by_layer["method"] == method]
    series = {kind: g.sort_values("layer")["iou"].tolist()
              for kind, g in rows.groupby("kind", sort=True)}
    plots.layer_lines(series, folder / f"layers_{method}.png",
                      baseline=I.random_iou_baseline(sparsity), baseline_label="random s/(2-s)",
                      ylabel="IoU", title=f"mask IoU per layer, {method}")
