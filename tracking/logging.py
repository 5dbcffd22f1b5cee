"""Log what a run records as MLflow params, metrics (step = layer) and artifacts.

The only place that decides metric names and artifact paths. It computes nothing: the job
(:mod:`jobs.artifacts`) builds the tables, files and plots, these functions log them.

- params: the canonical flat config (:func:`tracking.params.to_mlflow_params`) plus the
  perplexity definition;
- metrics: ``ppl.<lang>``, ``bpb.<lang>``, ``ppl_ratio.<lang>``, ``<task>.<lang>``,
  ``sparsity.actual``, ``sparsity.layer`` and ``sparsegpt_loss.layer`` (step = layer),
  ``time.prune_s``, ``time.eval_s``, ``memory.peak_rss_mb``;
- artifacts: ``config.yaml``, ``masks/masks.safetensors``, ``tables/*.csv``,
  ``calibration/manifest.json``, ``eval/*.json``, ``plots/ppl_vs_dense.png``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import Config
from tracking import params as P
from tracking.runs import TrackedRun

log = logging.getLogger(__name__)

MASKS_ARTIFACT = "masks/masks.safetensors"
TASK_DOCS_ARTIFACT = "eval/task_docs.parquet"  # one row per task document (outcomes)
PPL_WINDOWS_ARTIFACT = "eval/ppl_windows.parquet"  # one row per perplexity window


@dataclass(frozen=True)
class PruneRecord:
    """What a pruned run logs after pruning, built by the job.

    Attributes:
        mask_path: The packed mask file (named ``masks.safetensors``).
        mask_sha256: Its checksum (tag ``langprune.masks_sha256``).
        modules: Per-module sparsity table.
        layers: Per-layer sparsity table (``layer``, ``sparsity``, optionally ``loss``).
        overall: Overall sparsity numbers (``sparsity``, optionally
            ``preexisting_zero_fraction`` and ``damp_retries``).
        prune_s: Seconds spent pruning.
        calib_tokens: Calibration tokens used.
    """

    mask_path: Path
    mask_sha256: str
    modules: pd.DataFrame
    layers: pd.DataFrame
    overall: Mapping[str, Any]
    prune_s: float
    calib_tokens: float


def log_run_start(run: TrackedRun, cfg: Config, dense: bool, eval_data: pd.DataFrame,
                  eval_data_source: str) -> None:
    """Params, resolved config and the evaluation data set, before any heavy work.

    Args:
        eval_data: One row per evaluation language (``language``, ``sentences``, ``chars``).
        eval_data_source: Where the evaluation text lives (folder or hub page).
    """
    from pipeline.evaluate.perplexity import DEFINITION

    if dense:  # a dense run has no calibration or pruning: do not show misleading params
        params = cfg.to_flat(("model", "eval", "run"))
    else:
        params = P.to_mlflow_params(cfg)
    params["ppl_definition"] = DEFINITION
    run.log_params(params)
    run.log_text(cfg.to_yaml(), "config.yaml")
    run.log_dataset(eval_data, name=f"{cfg.eval.eval_source}-eval",
                    source=eval_data_source, context="evaluation")


def log_calibration(run: TrackedRun, cfg: Config, manifest: Mapping[str, Any],
                    source: str) -> None:
    """The calibration manifest and its windows as the run's calibration dataset input."""
    run.log_json(manifest, "calibration/manifest.json")
    frame = pd.DataFrame(manifest.get("windows", []))
    for col in frame.columns:  # lists (document ids) are not hashable by MLflow's digest
        if frame[col].map(lambda v: isinstance(v, (list, dict))).any():
            frame[col] = frame[col].map(str)
    blend = "+".join(sorted(cfg.calib.blend))
    run.log_dataset(frame, name=f"{cfg.calib.calib_source}-{blend}-set{cfg.calib.calib_set}",
                    source=source, context="calibration")


def log_prune(run: TrackedRun, record: PruneRecord) -> None:
    """Masks, sparsity tables, the mask checksum tag and the pruning step metrics."""
    run.log_artifact(record.mask_path, "masks")
    layers, overall = record.layers, record.overall
    run.log_table(record.modules, "tables/sparsity_modules.csv")
    run.log_table(layers, "tables/sparsity_layers.csv")
    run.set_tags({"langprune.masks_sha256": record.mask_sha256})
    run.log_step_metrics("sparsity.layer", dict(zip(layers["layer"], layers["sparsity"])))
    if "target" in layers:  # per-layer targets (layer_sparsity=owl)
        run.log_step_metrics("sparsity.layer_target",
                             dict(zip(layers["layer"], layers["target"])))
    if "loss" in layers and layers["loss"].notna().any():
        run.log_step_metrics("sparsegpt_loss.layer",
                             dict(zip(layers["layer"], layers["loss"].fillna(0.0))))
    run.log_metrics({
        "sparsity.actual": overall["sparsity"],
        "sparsity.preexisting_zeros": overall.get("preexisting_zero_fraction", 0.0),
        "time.prune_s": record.prune_s,
        "prune.damp_retries": overall.get("damp_retries", 0),
        "calib.tokens": record.calib_tokens,
    })


def log_eval(run: TrackedRun, report: Any, metrics: Mapping[str, float]) -> None:
    """Evaluation metrics and the JSON results (perplexity details, lm-eval results)."""
    run.log_metrics(metrics)
    run.log_json(report.ppl_details, "eval/perplexity.json")
    if report.task_results is not None:
        run.log_json(report.task_results, "eval/lm_eval_results.json")
    log_records(run, report)
    if report.skipped_tasks:
        run.set_tags({"langprune.skipped_tasks": ",".join(report.skipped_tasks)[:5000]})


def log_records(run: TrackedRun, report: Any) -> None:
    """The per-document task outcomes and per-window perplexity records, as Parquet."""
    if getattr(report, "task_docs", None) is not None:
        run.log_parquet(report.task_docs, TASK_DOCS_ARTIFACT)
    if getattr(report, "ppl_windows", None) is not None:
        run.log_parquet(report.ppl_windows, PPL_WINDOWS_ARTIFACT)


def log_ppl_plot(run: TrackedRun, path: Path) -> None:
    """The perplexity-vs-dense plot (``plots/ppl_vs_dense.png``)."""
    run.log_artifact(path, "plots")
