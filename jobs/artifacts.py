"""What a tracked ``main`` / ``dense`` run records, built from the pipeline's results.

The job side of :mod:`tracking.logging`: read the evaluation text's sizes, write the mask
file, build the sparsity tables and draw the perplexity plot, then hand tables, dicts and
file paths to :mod:`tracking.logging` (which names and logs them, and computes nothing).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import Config
from tracking import logging as L
from tracking import params as P
from tracking.runs import TrackedRun


def dataset_source(name: str) -> str:
    """Where a text source's data lives: the bundled folder, or the hub dataset's page."""
    from pipeline.data import hub_sources as H
    from pipeline.data.documents import DATASET_DIRS
    from pipeline.paths import data_dir

    hub = {"mc4": H.MC4_ID, "flores_hub": H.FLORES_PLUS_ID, "belebele_hub": H.BELEBELE_ID}
    if name in hub:
        return f"https://huggingface.co/datasets/{hub[name]}"
    return str(data_dir() / DATASET_DIRS[name])


def eval_frame(cfg: Config) -> pd.DataFrame:
    """One row per evaluation language: its number of sentences and characters."""
    from pipeline.data.sources import load_eval_sentences

    rows = []
    for lang in cfg.eval.eval_lang_list:
        sents = load_eval_sentences(cfg.eval.eval_source, lang)
        rows.append({"language": lang, "sentences": len(sents),
                     "chars": sum(len(s) for s in sents)})
    return pd.DataFrame(rows)


def interval_metrics(report: Any, seed: int = 0,
                     dense_windows: pd.DataFrame | None = None) -> dict[str, float]:
    """``<task>.<lang>.ci95_low/high/.n/.chance`` and ``ppl.<lang>.ci95_low/high``; with the
    dense run's per-window records also ``ppl_ratio.<lang>.ci95_low/high`` (paired)."""
    from analysis.scores import (
        ppl_interval_metrics,
        ppl_ratio_interval_metrics,
        task_interval_metrics,
    )

    out = {}
    if getattr(report, "task_docs", None) is not None:
        out.update(task_interval_metrics(report.task_docs))
    if getattr(report, "ppl_windows", None) is not None:
        out.update(ppl_interval_metrics(report.ppl_windows, seed=seed))
        if dense_windows is not None:
            out.update(ppl_ratio_interval_metrics(report.ppl_windows, dense_windows, seed=seed))
    return out


def record_start(run: TrackedRun, cfg: Config, dense: bool) -> None:
    """Params, resolved config and the evaluation data set, before any heavy work."""
    L.log_run_start(run, cfg, dense, eval_frame(cfg), dataset_source(cfg.eval.eval_source))


def record_prune(run: TrackedRun, cfg: Config, calib: Any, result: Any, prune_s: float,
                 workdir: Path) -> None:
    """Calibration manifest + dataset input, then the mask file, sparsity tables and metrics."""
    from pipeline.masks import save_masks
    from pipeline.sparsity import sparsity_tables

    L.log_calibration(run, cfg, calib.manifest, dataset_source(cfg.calib.calib_source))
    workdir.mkdir(parents=True, exist_ok=True)
    mask_path = workdir / "masks.safetensors"
    checksum = save_masks(result.masks, mask_path, metadata={"config_hash": cfg.config_hash()})
    modules, layers, overall = sparsity_tables(result)
    L.log_prune(run, L.PruneRecord(mask_path, checksum, modules, layers, overall, prune_s,
                                   float(calib.windows.numel())))


def record_eval(run: TrackedRun, cfg: Config, report: Any,
                dense: dict[str, float] | None,
                dense_windows: pd.DataFrame | None = None) -> dict[str, float]:
    """Evaluation metrics (with ratios against ``dense`` ppl, paired over ``dense_windows``
    when given) and their intervals, the per-document and per-window records, JSON results
    and the ppl plot."""
    metrics = {**report.metrics(dense),
               **interval_metrics(report, cfg.run.seed, dense_windows)}
    L.log_eval(run, report, metrics)
    if dense is not None:
        from analysis.run_plots import ppl_vs_dense

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "ppl_vs_dense.png"
            ppl_vs_dense(report.ppl, dense, path, title=P.run_name(cfg))
            L.log_ppl_plot(run, path)
    return metrics
