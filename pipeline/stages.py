"""The three stages of a run as plain functions: calibrate, prune, evaluate.

They know nothing of MLflow: they take the config and an in-memory model and return report
objects; :mod:`jobs.main` logs those reports through :mod:`tracking`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from pipeline.config import Config, text_part
from pipeline.errors import LangpruneError

log = logging.getLogger(__name__)

#: Columns of :attr:`EvalReport.ppl_windows`.
WINDOW_COLUMNS = ("lang", "window", "nll_sum", "n_tokens", "n_bytes")


@dataclass
class EvalReport:
    """Per-language perplexity / bits per byte and task scores of one model."""

    ppl: dict[str, float]
    bpb: dict[str, float]
    ppl_details: dict[str, dict[str, Any]]  # n_tokens, n_windows, n_bytes, definition per lang
    tasks: dict[str, float]  # "<task>.<lang>" -> score
    task_results: dict[str, Any] | None  # the full lm-eval results JSON
    skipped_tasks: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    # Per document of every multiple-choice task (pipeline.evaluate.doc_records.COLUMNS);
    # None when no task ran.
    task_docs: pd.DataFrame | None = None
    # Per perplexity window: lang, window, nll_sum (nats), n_tokens, n_bytes.
    ppl_windows: pd.DataFrame | None = None

    def metrics(self, dense_ppl: Mapping[str, float] | None = None) -> dict[str, float]:
        """Flat MLflow metrics; with the dense baseline's ppl also ``ppl_ratio.<lang>``."""
        out: dict[str, float] = {}
        for lang, v in self.ppl.items():
            out[f"ppl.{lang}"] = v
            out[f"bpb.{lang}"] = self.bpb[lang]
            if dense_ppl is not None and lang in dense_ppl:
                out[f"ppl_ratio.{lang}"] = v / dense_ppl[lang]
        out.update(self.tasks)
        out["time.eval_s"] = self.wall_s
        return out


def check_model_fits(cfg: Config, max_length: int | None) -> None:
    """seq_len / eval_seq_len must not exceed what the model allows (checked before work)."""
    if max_length is None:
        return
    for key, value in (("seq_len", cfg.calib.seq_len), ("eval_seq_len", cfg.eval.eval_seq_len)):
        if value > max_length:
            raise LangpruneError(f"{key}={value} is longer than the model allows ({max_length})")


def calibrate(cfg: Config, tokenizer: Any):
    """Token windows of the calibration blend (see :mod:`pipeline.data.sampler`)."""
    from pipeline.data.sampler import build_calibration

    return build_calibration(tokenizer, cfg.calib, seed=cfg.run.seed)


def prune(
    cfg: Config,
    model: torch.nn.Module,
    windows: torch.Tensor,
    device: torch.device,
    on_layer_done: Callable[..., None] | None = None,
    progress: bool = True,
):
    """Prune ``model`` in place, layer by layer; returns the engine's PruneResult."""
    from pipeline.engine import prune_layerwise
    from pipeline.pruners import pruner_from_config, target_from_config

    p = cfg.prune
    t0 = time.perf_counter()
    layer_sparsities = None
    if p.layer_sparsity == "owl":
        from pipeline.engine.owl import owl_layer_sparsities

        layer_sparsities = owl_layer_sparsities(
            model, windows, p.sparsity, m=p.owl_m, lam=p.owl_lambda, device=device,
            batch_size=p.capture_batch_size, offload=cfg.model.offload, progress=progress)
        log.info("OWL layer sparsities: %s", ", ".join(f"{s:.3f}" for s in layer_sparsities))
    result = prune_layerwise(
        model,
        windows,
        pruner_from_config(p),
        target_from_config(p),
        device=device,
        offload=cfg.model.offload,
        true_sequential=p.true_sequential,
        batch_size=p.capture_batch_size,
        on_layer_done=on_layer_done,
        progress=progress,
        layer_sparsities=layer_sparsities,
    )
    log.info("pruned with %s in %.1f s", p.method, time.perf_counter() - t0)
    return result


def evaluate(cfg: Config, model: torch.nn.Module, tokenizer: Any, device: torch.device,
             max_length: int | None = None, progress: bool = True) -> EvalReport:
    """Perplexity and bits per byte per evaluation language, then the lm-eval tasks."""
    with _executing_on(model, device, cfg.model.offload):
        return _evaluate(cfg, model, tokenizer, device, max_length, progress)


@contextmanager
def _executing_on(model: torch.nn.Module, device: torch.device, offload: bool):
    """With ``offload`` the model stays in CPU memory; accelerate's hooks move each module's
    weights to ``device`` just for its forward, and are removed again afterwards (the pruning
    engine does its own layer-by-layer onloading)."""
    if not offload or device.type == "cpu":
        yield
        return
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_submodules

    cpu_offload(model, execution_device=device)
    try:
        yield
    finally:
        remove_hook_from_submodules(model)


def _evaluate(cfg: Config, model: torch.nn.Module, tokenizer: Any, device: torch.device,
              max_length: int | None, progress: bool) -> EvalReport:
    from pipeline.data.sources import load_eval_sentences
    from pipeline.evaluate.perplexity import evaluate_perplexity_windows

    e = cfg.eval
    t0 = time.perf_counter()
    ppl, bpb, details = {}, {}, {}
    window_rows: list[dict[str, Any]] = []
    for lang in e.eval_lang_list:
        res, windows = evaluate_perplexity_windows(
            model,
            tokenizer,
            text_part(load_eval_sentences(e.eval_source, lang), e.eval_part),
            seq_len=e.eval_seq_len,
            token_budget=e.eval_tokens,
            batch_size=e.eval_batch_size,
            device=device,
            progress=progress,
            desc=f"ppl {lang}",
        )
        window_rows += [{"lang": lang, **dataclasses.asdict(w)} for w in windows]
        ppl[lang], bpb[lang] = res.ppl, res.bpb
        details[lang] = {
            "n_tokens": res.n_tokens,
            "n_windows": res.n_windows,
            "n_bytes": res.n_bytes,
            "n_sentences": res.n_sentences,
            "nll_sum": res.nll_sum,
            "definition": res.definition,
        }
        log.info("%s: ppl %.3f, bpb %.4f (%d tokens)", lang, res.ppl, res.bpb, res.n_tokens)
    tasks: dict[str, float] = {}
    results_json = None
    skipped: list[str] = []
    docs = None
    if e.task_list:
        from pipeline.evaluate.lm_eval_runner import run_tasks

        tr = run_tasks(
            model,
            tokenizer,
            e.task_list,
            e.eval_lang_list,
            limit=e.limit or None,
            num_fewshot=e.num_fewshot,
            batch_size=e.eval_batch_size,
            device=device,
            max_length=max_length,
            seed=cfg.run.seed,
            records=True,  # every tracked evaluation keeps its per-document outcomes
        )
        tasks, results_json, docs = tr.scores, tr.results_json, tr.records
        skipped = list(getattr(tr, "skipped", []))
    return EvalReport(ppl, bpb, details, tasks, results_json, skipped,
                      wall_s=time.perf_counter() - t0, task_docs=docs,
                      ppl_windows=pd.DataFrame(window_rows, columns=list(WINDOW_COLUMNS)))
