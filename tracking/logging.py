"""Turn stage reports into MLflow params, metrics (step = layer) and artifacts.

The only place that decides metric names and artifact paths:

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
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import Config
from tracking import params as P
from tracking.runs import TrackedRun

log = logging.getLogger(__name__)

MASKS_ARTIFACT = "masks/masks.safetensors"


def log_run_start(run: TrackedRun, cfg: Config, dense: bool) -> None:
    """Params, resolved config and the evaluation data set, before any heavy work."""
    from pipeline.evaluate.perplexity import DEFINITION

    if dense:  # a dense run has no calibration or pruning: do not show misleading params
        params = cfg.to_flat(("model", "eval", "run"))
    else:
        params = P.to_mlflow_params(cfg)
    params["ppl_definition"] = DEFINITION
    run.log_params(params)
    run.log_text(cfg.to_yaml(), "config.yaml")
    run.log_dataset(_eval_frame(cfg), name=f"{cfg.eval.eval_source}-eval",
                    source=dataset_source(cfg.eval.eval_source), context="evaluation")


def dataset_source(name: str) -> str:
    """Where a text source's data lives: the bundled folder, or the hub dataset's page."""
    from pipeline.data import sources as S
    from pipeline.paths import data_dir

    hub = {"mc4": S.MC4_ID, "flores_hub": S.FLORES_PLUS_ID, "belebele_hub": S.BELEBELE_ID}
    if name in hub:
        return f"https://huggingface.co/datasets/{hub[name]}"
    return str(data_dir() / S.DATASET_DIRS[name])


def _eval_frame(cfg: Config) -> pd.DataFrame:
    from pipeline.data.sources import load_eval_sentences

    rows = []
    for lang in cfg.eval.eval_lang_list:
        sents = load_eval_sentences(cfg.eval.eval_source, lang)
        rows.append({"language": lang, "sentences": len(sents),
                     "chars": sum(len(s) for s in sents)})
    return pd.DataFrame(rows)


def log_prune(run: TrackedRun, cfg: Config, calib: Any, result: Any, prune_s: float,
              workdir: Path) -> None:
    """Calibration manifest + dataset input, masks, sparsity tables and step metrics."""
    from pipeline.masks import save_masks
    from pipeline.sparsity import sparsity_tables

    manifest = calib.manifest
    run.log_json(manifest, "calibration/manifest.json")
    frame = pd.DataFrame(manifest.get("windows", []))
    for col in frame.columns:  # lists (document ids) are not hashable by MLflow's digest
        if frame[col].map(lambda v: isinstance(v, (list, dict))).any():
            frame[col] = frame[col].map(str)
    blend = "+".join(sorted(cfg.calib.blend))
    run.log_dataset(frame, name=f"{cfg.calib.calib_source}-{blend}-set{cfg.calib.calib_set}",
                    source=dataset_source(cfg.calib.calib_source), context="calibration")
    workdir.mkdir(parents=True, exist_ok=True)
    mask_path = workdir / "masks.safetensors"
    checksum = save_masks(result.masks, mask_path, metadata={"config_hash": cfg.config_hash()})
    run.log_artifact(mask_path, "masks")
    modules, layers, overall = sparsity_tables(result)
    run.log_table(modules, "tables/sparsity_modules.csv")
    run.log_table(layers, "tables/sparsity_layers.csv")
    run.set_tags({"langprune.masks_sha256": checksum})
    run.log_step_metrics("sparsity.layer", dict(zip(layers["layer"], layers["sparsity"])))
    if "loss" in layers and layers["loss"].notna().any():
        run.log_step_metrics("sparsegpt_loss.layer",
                             dict(zip(layers["layer"], layers["loss"].fillna(0.0))))
    run.log_metrics({
        "sparsity.actual": overall["sparsity"],
        "sparsity.preexisting_zeros": overall.get("preexisting_zero_fraction", 0.0),
        "time.prune_s": prune_s,
        "prune.damp_retries": overall.get("damp_retries", 0),
        "calib.tokens": float(calib.windows.numel()),
    })


def log_eval(run: TrackedRun, cfg: Config, report: Any,
             dense: dict[str, float] | None) -> dict[str, float]:
    """Evaluation metrics (with ratios against ``dense`` ppl), JSON results and the ppl plot."""
    metrics = report.metrics(dense)
    run.log_metrics(metrics)
    run.log_json(report.ppl_details, "eval/perplexity.json")
    if report.task_results is not None:
        run.log_json(report.task_results, "eval/lm_eval_results.json")
    if report.skipped_tasks:
        run.set_tags({"langprune.skipped_tasks": ",".join(report.skipped_tasks)[:5000]})
    if dense is not None:
        from analysis.run_plots import ppl_vs_dense

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "ppl_vs_dense.png"
            ppl_vs_dense(report.ppl, dense, path, title=P.run_name(cfg))
            run.log_artifact(path, "plots")
    return metrics
