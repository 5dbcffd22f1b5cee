"""The tracked ``main`` (prune + evaluate) and ``dense`` baseline jobs.

A job validates everything cheap first (config, tracking store, output folder, then
:func:`check_inputs`: the model probed without its weights, every corpus and evaluation text
read), reuses a finished run with the same canonical config and code version unless
``force``, and only then loads the model. The dense baseline is evaluated once per model and
evaluation config and reused by every pruned run (``ppl_ratio.<lang>`` compares against it).
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from jobs.artifacts import record_eval, record_prune, record_start
from pipeline import stages
from pipeline.config import CalibCfg, Config
from pipeline.paths import check_writable
from tracking import params as P
from tracking import runs as R

if TYPE_CHECKING:
    from pipeline.loading import ModelProbe

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    run_id: str
    reused: bool
    metrics: dict[str, float]


def numerics_tags(cfg: Config, device: Any) -> dict[str, str]:
    """The numerical choices the configured method makes on ``device``, as tags (e.g.
    ``langprune.sparsegpt_factor``: how SparseGPT computes chol(H^-1) there)."""
    from pipeline.pruners import pruner_from_config

    return {f"langprune.{k}": v for k, v in pruner_from_config(cfg.prune).numerics(device).items()}


def preflight(cfg: Config, calibs: Sequence[CalibCfg] = (), *,
              inputs: bool = True) -> tuple[str, ModelProbe | None]:
    """Cheap checks before any heavy work; returns the experiment id and the model probe.

    Args:
        cfg: the validated config.
        calibs: the calibration configs the job will build (their corpora are checked).
        inputs: also run :func:`check_inputs` (model, device, corpora, evaluation texts).

    Returns:
        ``(experiment_id, probe)``: the probe of :func:`check_inputs` (None without
        ``inputs`` or for sources not local yet). The job keeps it and hands it to
        :func:`_load`, so the model loads with the tokenizer the probe read.
    """
    R.check_tracking_reachable()
    out = Path(cfg.run.output_dir)
    check_writable(out, "output_dir")
    if cfg.eval.task_list:
        from pipeline.evaluate.lm_eval_runner import validate_tasks

        validate_tasks(cfg.eval.task_list, cfg.eval.eval_lang_list)
    probe = check_inputs(cfg, calibs) if inputs else None
    exp_id = R.experiment_id(cfg.run.experiment)
    R.reap_stale_runs(exp_id)
    from pipeline.masks import remove_stale_temporaries

    for path in remove_stale_temporaries(out):
        log.warning("removed %s, a partial mask file of a killed run", path)
    return exp_id, probe


def check_inputs(cfg: Config, calibs: Sequence[CalibCfg] = (),
                 eval_langs: Sequence[str] | None = None) -> ModelProbe | None:
    """Check the model, the device and every text a job reads, without loading weights.

    The model is probed (:func:`pipeline.loading.probe_model`: path, architecture, decoder
    layers, tokenizer), ``seq_len``/``eval_seq_len`` are checked against what it allows,
    each calibration corpus is read and, with the tokenizer, cut into the job's windows
    (too short, non-UTF-8 or empty fails here), and the evaluation sentences of
    ``eval_langs`` (default: ``cfg.eval_langs``) are read. Hub sources are left to loading.

    Returns:
        The :class:`~pipeline.loading.ModelProbe`, or None for sources not local yet.

    Raises:
        LangpruneError: the first problem found, as one line.
    """
    from pipeline.data.sampler import build_calibration, check_corpus
    from pipeline.data.sources import get_source, load_eval_sentences
    from pipeline.loading import probe_model

    probe = probe_model(cfg.model)
    if probe is not None:
        stages.check_model_fits(cfg, probe.max_length)
    for calib in dict.fromkeys(calibs):  # sweeps repeat a calibration per method
        check_corpus(calib)
        if probe is not None:
            build_calibration(probe.tokenizer, calib, seed=cfg.run.seed, progress=False)
    if not get_source(cfg.eval.eval_source).hub:
        for lang in cfg.eval.eval_lang_list if eval_langs is None else eval_langs:
            load_eval_sentences(cfg.eval.eval_source, lang)
    return probe


def _reuse(exp_id: str, config_hash: str, name: str) -> str | None:
    _, _, code = P.code_version()
    found = R.find_complete_run(exp_id, config_hash, code)
    if found is None:
        return None
    log.info("reusing finished run %s (%s); pass force=true to run again", found, name)
    print(f"reusing finished run {found} ({name})")
    # the run `mlflow run` created, if any, points at the result
    wrapper = R.take_over_launched_run(f"reused-{name}", {P.TAG_KIND: "reuse"})
    if wrapper is not None:
        wrapper.set_tags({P.TAG_REUSED: found})
        wrapper.finish(state="reused")
    return found


def _load(cfg: Config, probe: ModelProbe | None):
    """Load ``cfg``'s model; with the preflight's ``probe``, with the tokenizer it read."""
    from pipeline.loading import load_model

    loaded = load_model(cfg.model, probe.tokenizer if probe is not None else None)
    stages.check_model_fits(cfg, loaded.max_length)
    return loaded


def run_dense(cfg: Config, loaded: Any = None, entry_point: str = "dense", *,
              probe: ModelProbe | None = None) -> tuple[str, Any]:
    """Evaluate the unpruned model once per model + evaluation config; reuse it after.

    ``probe`` is the caller's :func:`preflight` probe, used when the model is loaded here
    (``loaded`` None).

    Returns ``(run_id, EvalReport or None)``; the report is None when a finished dense run
    was reused (its metrics are then read from the store).
    """
    exp_id = R.experiment_id(cfg.run.experiment)
    name = P.run_name(cfg, "dense")
    if not cfg.run.force and (found := _reuse(exp_id, P.dense_hash(cfg), name)):
        return found, None
    loaded = loaded or _load(cfg, probe)
    tags = P.run_tags(cfg, "dense", str(loaded.device), entry_point)
    # Only the `dense` entry point owns the run `mlflow run` created; elsewhere the dense
    # baseline is a run of its own next to the pruned one.
    run = R.attach_or_create(exp_id, name, tags, take_launched=entry_point == "dense")
    with R.run_guard(run):
        record_start(run, cfg, dense=True)
        report = stages.evaluate(cfg, loaded.model, loaded.tokenizer, loaded.device,
                                 loaded.max_length)
        record_eval(run, cfg, report, dense=None)
        run.log_metrics(_peak_memory(loaded.device))
        run.finish()
    print(f"dense baseline run {run.run_id} ({name})")
    return run.run_id, report


def run_metrics(run_id: str) -> dict[str, float]:
    return dict(R.client().get_run(run_id).data.metrics)


def run_main(cfg: Config, entry_point: str = "main", *, parent_run_id: str | None = None,
             extra_tags: dict[str, str] | None = None, loaded: Any = None,
             check: bool = True) -> JobResult:
    """Prune with the calibration blend, evaluate every language, log it all.

    Args:
        cfg: the validated config.
        entry_point: recorded as a tag.
        parent_run_id: make the run a child (sweep cells, search trials).
        extra_tags: more tags for the run (e.g. the Optuna trial number).
        loaded: an already loaded *dense* model to prune in place (the caller restores it);
            None loads the model.
        check: run :func:`preflight` (callers that already did may skip it).
    """
    exp_id, probe = (preflight(cfg, [cfg.calib]) if check
                     else (R.experiment_id(cfg.run.experiment), None))
    name = P.run_name(cfg)
    if not cfg.run.force and (found := _reuse(exp_id, cfg.config_hash(), name)):
        return JobResult(found, True, run_metrics(found))
    tags = {**P.run_tags(cfg, "pruned", "pending", entry_point), **(extra_tags or {})}
    run = R.attach_or_create(exp_id, name, tags, parent=parent_run_id, take_launched=True)
    with R.run_guard(run):
        record_start(run, cfg, dense=False)
        run.start_system_metrics()
        loaded = loaded or _load(cfg, probe)
        run.set_tags({P.TAG_DEVICE: str(loaded.device), **numerics_tags(cfg, loaded.device)})
        calib = stages.calibrate(cfg, loaded.tokenizer)
        # `force` re-runs this run; the shared dense baseline is still reused.
        dense_id, dense_report = run_dense(cfg.replace(force=False), loaded,
                                           entry_point=entry_point)
        run.set_tags({P.TAG_DENSE: dense_id})
        dense_ppl = (dense_report.ppl if dense_report is not None
                     else _ppl_from_metrics(dense_id))
        dense_windows = (dense_report.ppl_windows if dense_report is not None
                         else _windows_from_store(dense_id))
        t0 = time.perf_counter()
        result = stages.prune(cfg, loaded.model, calib.windows, loaded.device)
        prune_s = time.perf_counter() - t0
        record_prune(run, cfg, calib, result, prune_s, Path(cfg.run.output_dir) / run.run_id)
        report = stages.evaluate(cfg, loaded.model, loaded.tokenizer, loaded.device,
                                 loaded.max_length)
        metrics = record_eval(run, cfg, report, dense=dense_ppl, dense_windows=dense_windows)
        run.log_metrics(_peak_memory(loaded.device))
        run.finish()
    print(f"finished run {run.run_id} ({name})")
    return JobResult(run.run_id, False, metrics)


def _ppl_from_metrics(run_id: str) -> dict[str, float]:
    m = run_metrics(run_id)
    return {k.split(".", 1)[1]: v for k, v in m.items() if k.startswith("ppl.")}


def _windows_from_store(run_id: str) -> Any:
    """The dense run's per-window perplexity records (None for runs that predate them)."""
    from tracking.logging import PPL_WINDOWS_ARTIFACT
    from tracking.runs_table import read_parquet_artifact

    return read_parquet_artifact(run_id, PPL_WINDOWS_ARTIFACT)


def _peak_memory(device: torch.device) -> dict[str, float]:
    out = {"memory.peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["memory.peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out
