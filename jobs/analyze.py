"""The ``analyze`` job: mask IoU across a sweep, then SNR, LSAR and LAPE for each pruned run.

Everything is recomputed from the tracking store plus the model and the bundled evaluation
text: a member run contributes only its params and its ``masks/masks.safetensors``.

1. **IoU** (:func:`analyze_iou`, computed by :func:`analysis.mask_iou.write_iou`): every
   pair of member runs of the same method, on the packed masks (popcount, one module at a
   time), logged with the sweep parent run: per-pair
   per-module / per-layer / per-module-type / overall tables, the language x language
   matrix per method (intra-language on the diagonal), headline metrics and heatmaps with
   the random baseline s/(2-s).
2. **Per-run analyses** (:func:`analyze_member`) for members not yet tagged
   ``langprune.analysis=done`` (or all with ``force``). The dense model is loaded once; each
   run's masks are applied to it (``pipeline.masks.apply_masks``, bit-exact zeros) and the
   dense weights are restored after (:class:`pipeline.models.DenseSnapshot`). On FLORES
   windows of every evaluation language (``analysis_tokens`` per language, windows of
   ``analysis_seq_len`` tokens, BOS first when the tokenizer has one):

   - SNR per decoder layer, local (pruned layer on the dense layer input) and accumulated
     (the pruned model on its own states), against the dense layer output;
   - LAPE activation counts of every FFN neuron (act_fn(gate_proj x) > 0, i.e. gate > 0, for
     gated MLPs; the down projection's input otherwise) of the pruned model;

   and on parallel FLORES sentences (the same first K sentences in every language) the
   LSAR change of the agnostic and specific parts of each layer's pooled output.

The dense side (LSAR pooled states and fitted bases, LAPE counts) is computed once per
model, dtype and evaluation text and cached under ``cache_dir()/analysis/<key>`` as
safetensors + JSON; the per-layer dense states SNR compares against are recomputed once
per process (one forward pass).

A method that also updates the weights it keeps (SparseGPT) is analysed on the weights it
evaluated: :mod:`jobs.reprune` re-prunes the run's logged config on the dense model and
refuses the run unless the re-pruned mask's sha256 is the logged one; mask-only methods are
dense x mask, which is the same model. The tag ``langprune.analysis.weights`` says which.

The computations live in :mod:`analysis` (text, neurons, passes, reference, measure,
mask_iou); this module reads and logs through :mod:`tracking` and loads the model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from torch import Tensor
from tqdm.auto import tqdm

from analysis import lape as LP
from analysis import plots
from analysis import snr as S
from analysis.mask_iou import write_iou
from analysis.measure import (
    Context,
    analysis_summary,
    headline_metrics,
    interval_metrics,
    lape_frame,
    lsar_frame,
    measure,
)
from analysis.neurons import NeuronCounter, ffn_layout
from analysis.passes import Engine, dense_window_states
from analysis.reference import (
    DenseReference,
    compute_dense_reference,
    dense_cache_key,
    load_dense_reference,
    save_dense_reference,
)
from analysis.text import AnalysisText, build_text
from jobs.reprune import apply_run_weights
from pipeline.config import Config, ModelCfg, split_list
from pipeline.errors import LangpruneError
from pipeline.masks import load_packed, read_metadata
from tracking import params as P
from tracking import runs as R
from tracking import runs_table as RT

if TYPE_CHECKING:
    from pipeline.loading import ModelProbe

log = logging.getLogger(__name__)

# ---- analysis context ------------------------------------------------------------------------


def analysis_model_cfg(cfg: Config, sweep_params: Mapping[str, str]) -> ModelCfg:
    """The sweep's model (what was pruned) with this job's device, dtype and offload."""
    return ModelCfg(
        model=sweep_params.get("model", cfg.model.model),
        device=cfg.model.device,
        dtype=cfg.model.dtype,
        offload=cfg.model.offload,
        trust_remote_code=sweep_params.get("trust_remote_code", "false") == "true",
        model_cache=cfg.model.model_cache,
    )


def build_context(cfg: Config, sweep: RT.Sweep, *, progress: bool = True,
                  probe: ModelProbe | None = None) -> Context:
    """Load the model once, prepare the text and the dense reference (from cache if there).

    ``probe`` is the one :func:`check_mask_files` made; the model loads with its tokenizer.
    """
    from pipeline.models import DenseSnapshot
    from pipeline.paths import cache_dir

    t0 = time.perf_counter()
    a = cfg.analysis
    engine, text, key, tokenizer = _load_engine(cfg, sweep, progress, probe)
    folder = cache_dir(cfg.model.model_cache) / "analysis" / key
    timings = {"load_s": time.perf_counter() - t0}
    t1 = time.perf_counter()
    dense, states, windows = _dense_side(engine, text, key, folder, a.lsar_pooling)
    timings["dense_s"] = time.perf_counter() - t1
    selection = LP.select_language_specific(dense.lape.probabilities(), list(text.languages),
                                            a.lape_top_rate, a.lape_filter_quantile)
    return Context(cfg, engine, DenseSnapshot(engine.model), text, dense, states, selection,
                   folder, timings, tokenizer, windows)


def _load_engine(
    cfg: Config, sweep: RT.Sweep, progress: bool, probe: ModelProbe | None
) -> tuple[Engine, AnalysisText, str, Any]:
    """The sweep's model loaded, its evaluation text, the dense cache key and the tokenizer."""
    from pipeline.loading import load_model
    from pipeline.models import decoder_layers

    a = cfg.analysis
    langs = split_list(sweep.params.get("eval_langs", cfg.eval.eval_langs))
    source = sweep.params.get("eval_source", cfg.eval.eval_source)
    loaded = load_model(analysis_model_cfg(cfg, sweep.params),
                        probe.tokenizer if probe is not None else None)
    text = build_text(loaded.tokenizer, source, langs, a.analysis_tokens, a.analysis_seq_len,
                      a.lsar_sentences)
    layout, n_neurons = ffn_layout(decoder_layers(loaded.model)[0])
    engine = Engine(loaded.model, loaded.device, cfg.prune.capture_batch_size, cfg.model.offload,
                    layout, n_neurons, progress)
    key = dense_cache_key(loaded.source, loaded.n_params, cfg.model.dtype, a.lsar_pooling, text)
    return engine, text, key, loaded.tokenizer


def _dense_side(
    engine: Engine, text: AnalysisText, key: str, folder: Path, pooling: str
) -> tuple[DenseReference, dict[str, list[list[Tensor]]], LP.ActivationCounter]:
    """The dense reference (cached in ``folder``, computed there if missing), dense states and
    the dense LAPE counts per window (recounted with the states when the reference is cached).
    """
    dense = load_dense_reference(folder)
    if dense is None:
        log.info("computing the dense analysis reference (cached at %s)", folder)
        dense, states = compute_dense_reference(engine, text, pooling, key)
        save_dense_reference(dense, folder)
        return dense, states, dense.lape
    log.info("dense analysis reference from cache %s", folder)
    counter = LP.ActivationCounter(text.languages, len(engine.layers), engine.n_neurons,
                                   per_window=True)
    hooks = NeuronCounter(counter, engine.layout)
    states = {}
    with hooks.hooked(engine.layers):
        for lang in text.languages:
            with hooks.counting(lang):
                states[lang] = dense_window_states(engine, text.windows[lang])
    return dense, states, counter


# ---- one run ---------------------------------------------------------------------------------


def analyze_member(ctx: Context, member: RT.Member, masks_path: Path) -> dict[str, float]:
    """Put the run's evaluated weights into the dense model
    (:func:`jobs.reprune.apply_run_weights`), measure, restore, and log it all to the run."""
    t0 = time.perf_counter()
    packed = load_packed(masks_path)
    ctx.snapshot.restore()
    try:
        weights = apply_run_weights(ctx, member, packed)
        raw = measure(ctx)
    finally:
        ctx.snapshot.restore()
    snr = S.snr_table(raw.snr_local, raw.snr_acc)
    lsar = lsar_frame(ctx, raw.pooled)
    lape, removed_all, pruned_scores = lape_frame(ctx, raw.lape, packed)
    metrics = {**headline_metrics(snr, lsar, lape, removed_all),
               **interval_metrics(ctx, raw, packed)}
    metrics["time.analysis_s"] = time.perf_counter() - t0
    log_member(ctx, member, snr, lsar, lape, raw.lape, pruned_scores, metrics, weights)
    return metrics


def log_member(
    ctx: Context, member: RT.Member, snr: pd.DataFrame, lsar: pd.DataFrame, lape: pd.DataFrame,
    counts: LP.ActivationCounter, pruned_scores: Tensor, metrics: Mapping[str, float],
    weights: str,
) -> None:
    """Step metrics, headline metrics, tables, LAPE counts and histogram; tag done last."""
    run = R.TrackedRun(member.run_id)
    for (kind, lang), group in snr.groupby(["kind", "eval_lang"], sort=True):
        name = "snr_local" if kind == "local" else "snr_acc"
        values = {int(r.layer): float(r.snr_db) for r in group.itertuples()
                  if not math.isnan(r.snr_db)}
        run.log_step_metrics(f"{name}.{lang}", values)
    run.log_metrics(metrics)
    run.log_table(snr, RT.SNR_TABLE)
    if len(lsar):
        run.log_table(lsar, RT.LSAR_TABLE)
    run.log_table(lape, RT.LAPE_TABLE)
    _log_lape_files(run, ctx, member, counts, pruned_scores)
    run.log_json(analysis_summary(ctx, member, weights, metrics), RT.ANALYSIS_SUMMARY)
    run.set_tags({"langprune.analysis.weights": weights,
                  "langprune.analysis.lsar_source": ctx.text.lsar_source,
                  "langprune.analysis.dense_cache": ctx.dense.key, RT.TAG_ANALYSIS: "done"})


def _log_lape_files(
    run: R.TrackedRun, ctx: Context, member: RT.Member, counts: LP.ActivationCounter,
    pruned_scores: Tensor,
) -> None:
    """The run's LAPE counts file and the dense-vs-run LAPE histogram, under ``analysis/``."""
    with tempfile.TemporaryDirectory() as tmp:
        counts_path = Path(tmp) / Path(RT.LAPE_COUNTS).name
        LP.save_counts(counts, counts_path)
        run.log_artifact(counts_path, "analysis")
        hist = plots.lape_histograms(
            LP.lape_scores(ctx.dense.lape.probabilities()).numpy(),
            {f"{member.method} {member.calib_lang}": pruned_scores.numpy()},
            Path(tmp) / "lape_hist.png",
            title=f"LAPE: dense vs {member.method} {member.calib_lang}")
        run.log_artifact(hist, "analysis")


# ---- IoU -------------------------------------------------------------------------------------


def analyze_iou(
    parent: R.TrackedRun, members: Sequence[RT.Member], mask_paths: Mapping[str, Path],
    *, progress: bool = False,
) -> dict[str, float]:
    """Pairwise mask IoU of same-method members, logged to the sweep parent (``iou/``).

    ``mask_paths`` must have passed :func:`check_mask_files` (format and checksum).
    """
    with tempfile.TemporaryDirectory() as tmp:
        metrics = write_iou(members, mask_paths, Path(tmp), progress=progress)
        if metrics is None:
            log.warning("no two runs share a method: no mask IoU to compute")
            return {}
        for path in sorted(Path(tmp).iterdir()):
            parent.log_artifact(path, RT.IOU_DIR)
    parent.log_metrics(metrics)
    return metrics


# ---- the job ---------------------------------------------------------------------------------


def _check_members(members: Sequence[RT.Member], sweep: RT.Sweep) -> None:
    """Every run to analyse must be of the sweep's model (before anything heavy)."""
    model = sweep.params.get("model")
    for m in members:
        if m.params.get("model") != model:
            raise LangpruneError(
                f"run {m.run_id} pruned model {m.params.get('model')!r}, the sweep is of {model!r}"
            )


def _wrapper(parent_id: str) -> R.TrackedRun | None:
    """The run ``mlflow run -e analyze`` created, taken over as an analyze run of the sweep
    (None without one)."""
    tags = {P.TAG_KIND: "analyze", P.TAG_STATE: "running", RT.TAG_SWEEP: parent_id}
    return R.take_over_launched_run(f"analyze-{parent_id[:8]}", tags)


def run_analyze(cfg: Config) -> None:
    """IoU across the sweep's members; SNR, LSAR and LAPE for members lacking them.

    Args:
        cfg: ``sweep_run`` (or the newest finished sweep), the analysis budgets, device,
            dtype, offload and ``force`` (re-analyse every member).

    Raises:
        LangpruneError: no sweep, a sweep without members, or members of another model.
    """
    R.check_tracking_reachable()
    exp_id = R.experiment_id(cfg.run.experiment)
    sweep = RT.load_sweep(RT.find_sweep(exp_id, cfg.analysis.sweep_run))
    if not sweep.members:
        raise LangpruneError(f"sweep {sweep.run_id} has no successful member runs")
    todo = [m for m in sweep.members if cfg.run.force or m.tags.get(RT.TAG_ANALYSIS) != "done"]
    _check_members(todo, sweep)
    wrapper = _wrapper(sweep.run_id)
    guard = R.run_guard(wrapper) if wrapper is not None else contextlib.nullcontext()
    with guard, tempfile.TemporaryDirectory(prefix="langprune-analyze-") as tmp:
        paths = {m.run_id: RT.download_masks(m.run_id, tmp) for m in sweep.members}
        probe = check_mask_files(cfg, sweep, paths)
        parent = R.TrackedRun(sweep.run_id)
        analyze_iou(parent, sweep.members, paths, progress=True)
        done = _analyze_members(cfg, sweep, parent, todo, paths, probe)
        print(f"analyzed sweep {sweep.run_id}: IoU over {len(sweep.members)} runs; SNR/LSAR/LAPE "
              f"for {len(done)} run(s), {len(sweep.members) - len(done)} already done")
        if wrapper is not None:
            wrapper.log_json({"sweep_run": sweep.run_id, "analyzed": done}, "analyze.json")
            wrapper.finish()


def check_mask_files(cfg: Config, sweep: RT.Sweep,
                     paths: Mapping[str, Path]) -> ModelProbe | None:
    """Before the model loads: every member's mask file is intact (format, sha256), is the file
    the run logged (its ``langprune.masks_sha256`` tag), and fits the model (every name a
    module with a weight of the mask's shape, read off the model's meta-device skeleton).

    Returns:
        The model's :class:`~pipeline.loading.ModelProbe` (None for a source not local yet),
        for :func:`build_context` to load the model with its tokenizer.

    Raises:
        LangpruneError: one line naming the run and the first problem.
    """
    from pipeline.loading import probe_model

    probe = probe_model(analysis_model_cfg(cfg, sweep.params))
    for member in sweep.members:
        path = paths[member.run_id]
        load_packed(path)  # format and payload checksum
        meta = read_metadata(path)
        logged = member.tags.get("langprune.masks_sha256")
        if logged and meta["sha256"] != logged:
            raise LangpruneError(
                f"mask file of run {member.run_id} has sha256 {meta['sha256'][:12]}..., but the "
                f"run logged {logged[:12]}...: the artifact was replaced"
            )
        if probe is not None:  # a model not yet converted: apply_masks checks shapes later
            _check_shapes(member.run_id, json.loads(meta["shapes"]), probe)
    return probe


def _check_shapes(run_id: str, shapes: Mapping[str, Sequence[int]], probe: ModelProbe) -> None:
    """Every mask names a module of the probed model with a weight of the mask's shape."""
    for name, shape in shapes.items():
        want = probe.weight_shapes.get(name)
        if want is None:
            raise LangpruneError(
                f"mask file of run {run_id}: {name!r} names no module with a weight "
                f"in {probe.folder}"
            )
        if tuple(shape) != want:
            raise LangpruneError(
                f"mask file of run {run_id}: {name!r} has shape {tuple(shape)}, the "
                f"model's weight has {want}"
            )


def _analyze_members(
    cfg: Config, sweep: RT.Sweep, parent: R.TrackedRun, todo: Sequence[RT.Member],
    paths: Mapping[str, Path], probe: ModelProbe | None,
) -> list[str]:
    if not todo:
        return []
    ctx = build_context(cfg, sweep, probe=probe)
    _log_dense(parent, ctx)
    done = []
    for member in tqdm(todo, desc="analyze runs"):
        metrics = analyze_member(ctx, member, paths[member.run_id])
        log.info("analyzed %s (%s %s set %d) in %.1f s", member.run_id, member.method,
                 member.calib_lang, member.calib_set, metrics["time.analysis_s"])
        done.append(member.run_id)
    return done


def _log_dense(parent: R.TrackedRun, ctx: Context) -> None:
    """The dense LAPE counts (for the report's distributions) and timings, on the parent."""
    counts = ctx.dense.lape
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(RT.DENSE_LAPE_COUNTS).name
        LP.save_counts(counts, path)
        parent.log_artifact(path, "analysis")
    parent.set_tags({"langprune.analysis.dense_cache": ctx.dense.key})
    parent.log_metrics({f"time.analysis_{k}": v for k, v in ctx.timings.items()})
