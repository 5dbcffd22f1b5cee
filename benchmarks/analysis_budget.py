"""Time the analyze step's parts per run on the default model, at several analysis budgets.

For each ``--tokens`` budget: the dense side (once per sweep), one run's passes (SNR, LAPE,
LSAR on a Wanda-masked model) and its bootstrap intervals, with the headline intervals'
half-widths; and once, the SparseGPT re-prune the analysis of a weight-updating run adds.
No tracking store: the same functions :mod:`jobs.analyze` calls.

    .venv/bin/python benchmarks/analysis_budget.py --tokens 1024 2048 --langs ar,de,en,es,ru,sw,zh
"""

from __future__ import annotations

import argparse
import time

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


def _half(m: dict[str, float], name: str) -> float:
    return (m[f"{name}.ci95_high"] - m[f"{name}.ci95_low"]) / 2


def time_budget(cfg: Config, loaded, tokens: int, masks) -> None:
    a = cfg.analysis
    t0 = time.perf_counter()
    text = build_text(loaded.tokenizer, cfg.eval.eval_source, cfg.eval.eval_lang_list, tokens,
                      a.analysis_seq_len, a.lsar_sentences)
    layout, n = ffn_layout(decoder_layers(loaded.model)[0])
    eng = Engine(loaded.model, loaded.device, cfg.prune.capture_batch_size, False, layout, n)
    dense, states = compute_dense_reference(eng, text, a.lsar_pooling, "bench")
    t1 = time.perf_counter()
    sel = LP.select_language_specific(dense.lape.probabilities(), list(text.languages),
                                      a.lape_top_rate, a.lape_filter_quantile)
    ctx = Context(cfg, eng, None, text, dense, states, sel, None)  # type: ignore[arg-type]
    snap = DenseSnapshot(loaded.model)
    apply_masks(loaded.model, masks)
    raw = measure(ctx)
    t2 = time.perf_counter()
    m = interval_metrics(ctx, raw)
    t3 = time.perf_counter()
    snap.restore()
    k = int(next(iter(text.sentences.values())).shape[0])
    w = int(next(iter(text.windows.values())).shape[0])
    print(f"tokens {tokens}: {w} windows x {a.analysis_seq_len}, {k} LSAR prompts "
          f"({text.lsar_source}); dense side {t1 - t0:.1f} s, run passes {t2 - t1:.1f} s, "
          f"intervals {t3 - t2:.1f} s")
    for name in ("snr_acc.band.late", "snr_local.band.middle", "lsar.rel.agnostic",
                 "lsar.rel.agnostic.band.late", "lsar.rel.agnostic.midlate_minus_early"):
        print(f"  {name}: {m[name]:.4g} +- {_half(m, name):.3g} (95% half-width)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[1024])
    p.add_argument("--langs", default="ar,de,en,es,ru,sw,zh")
    p.add_argument("--reprune", action="store_true", help="also time a SparseGPT re-prune")
    args = p.parse_args()
    cfg = Config.from_overrides({"eval_langs": args.langs, "device": "cpu", "method": "wanda"})
    loaded = load_model(cfg.model)
    t0 = time.perf_counter()
    calib = stages.calibrate(cfg, loaded.tokenizer)
    snap = DenseSnapshot(loaded.model)
    masks = stages.prune(cfg, loaded.model, calib.windows, loaded.device, progress=False).masks
    print(f"wanda prune (for a mask) {time.perf_counter() - t0:.1f} s")
    snap.restore()
    if args.reprune:
        sg = cfg.replace(method="sparsegpt")
        t0 = time.perf_counter()
        calib = stages.calibrate(sg, loaded.tokenizer)
        stages.prune(sg, loaded.model, calib.windows, loaded.device, progress=False)
        print(f"sparsegpt re-prune (calibrate + prune) {time.perf_counter() - t0:.1f} s")
        snap.restore()
    for tokens in args.tokens:
        time_budget(cfg, loaded, tokens, masks)


if __name__ == "__main__":
    main()
