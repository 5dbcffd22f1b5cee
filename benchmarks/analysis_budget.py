"""Time the analyze step's parts per run on the default model, at several analysis budgets.

For each ``--tokens`` budget: the dense side (once per sweep), one run's passes (SNR, LAPE,
LSAR on a Wanda-masked model) and its bootstrap intervals, with the headline intervals'
half-widths; and once, the SparseGPT re-prune the analysis of a weight-updating run adds.
No tracking store: the same functions :mod:`jobs.analyze` calls.

    .venv/bin/python benchmarks/analysis_budget.py --tokens 1024 2048 --reprune

Each phase prints wall and CPU seconds (``time.process_time``): on a shared machine the CPU
seconds divided by the threads torch uses are the better estimate of a quiet run. The mask
comes from magnitude pruning (no calibration): the passes cost the same for any mask.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from analysis import lape as LP
from analysis.measure import Context, interval_metrics, measure
from analysis.neurons import ffn_layout
from analysis.passes import Engine
from analysis.reference import compute_dense_reference
from analysis.text import build_text
from pipeline import stages
from pipeline.config import Config
from pipeline.loading import load_model
from pipeline.masks import apply_masks
from pipeline.models import DenseSnapshot, decoder_layers


def timed(fn: Callable[[], Any]) -> tuple[Any, str]:
    """``fn()`` and "wall W s, cpu C s"."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, f"wall {time.perf_counter() - w:.1f} s, cpu {time.process_time() - c:.1f} s"


def _half(m: dict[str, float], name: str) -> float:
    return (m[f"{name}.ci95_high"] - m[f"{name}.ci95_low"]) / 2


def time_budget(cfg: Config, loaded: Any, tokens: int, masks: Any) -> None:
    a = cfg.analysis
    text = build_text(loaded.tokenizer, cfg.eval.eval_source, cfg.eval.eval_lang_list, tokens,
                      a.analysis_seq_len, a.lsar_sentences)
    layout, n = ffn_layout(decoder_layers(loaded.model)[0])
    eng = Engine(loaded.model, loaded.device, cfg.prune.capture_batch_size, False, layout, n)
    (dense, states), t_dense = timed(
        lambda: compute_dense_reference(eng, text, a.lsar_pooling, "bench"))
    sel = LP.select_language_specific(dense.lape.probabilities(), list(text.languages),
                                      a.lape_top_rate, a.lape_filter_quantile)
    ctx = Context(cfg, eng, None, text, dense, states, sel, None)  # type: ignore[arg-type]
    snap = DenseSnapshot(loaded.model)
    apply_masks(loaded.model, masks)
    raw, t_run = timed(lambda: measure(ctx))
    m, t_ci = timed(lambda: interval_metrics(ctx, raw))
    snap.restore()
    k = int(next(iter(text.sentences.values())).shape[0])
    w = int(next(iter(text.windows.values())).shape[0])
    print(f"tokens {tokens}: {w} windows x {a.analysis_seq_len}, {k} LSAR prompts "
          f"({text.lsar_source}); dense side {t_dense}; run passes {t_run}; intervals {t_ci}",
          flush=True)
    for name in ("snr_acc.band.late", "snr_local.band.middle", "lsar.rel.agnostic",
                 "lsar.rel.agnostic.band.late", "lsar.rel.agnostic.midlate_minus_early"):
        print(f"  {name}: {m[name]:.4g} +- {_half(m, name):.3g} (95% half-width)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[1024])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--langs", default="ar,de,en,es,ru,sw,zh")
    p.add_argument("--reprune", action="store_true", help="also time a SparseGPT re-prune")
    args = p.parse_args()
    cfg = Config.from_overrides({"eval_langs": args.langs, "device": "cpu",
                                 "analysis_seq_len": str(args.seq_len)})
    print(f"torch threads {torch.get_num_threads()}", flush=True)
    loaded = load_model(cfg.model)
    snap = DenseSnapshot(loaded.model)
    mag = cfg.replace(method="magnitude")
    masks = stages.prune(mag, loaded.model, torch.empty(0, 1, dtype=torch.long), loaded.device,
                         progress=False).masks
    snap.restore()
    if args.reprune:
        sg = cfg.replace(method="sparsegpt")

        def reprune() -> None:
            calib = stages.calibrate(sg, loaded.tokenizer)
            stages.prune(sg, loaded.model, calib.windows, loaded.device, progress=False)

        print(f"sparsegpt re-prune (calibrate + prune): {timed(reprune)[1]}", flush=True)
        snap.restore()
    for tokens in args.tokens:
        time_budget(cfg, loaded, tokens, masks)


if __name__ == "__main__":
    main()
