"""Fast versus exact blend-search trials: time per trial and how well fast ranks blends.

For >= 10 blends (target-only plus seeded random points of the simplex) it runs

- a *fast* trial: prune every layer from the cached per-language statistics of the dense
  model (:func:`pipeline.engine.blend.prune_from_stats`) and evaluate the target language;
- an *exact* trial: the full layer-wise prune with the blend's own windows
  (:func:`pipeline.stages.prune`, what ``run_main`` does, without tracking) and the same
  evaluation;

and prints a table, the speed-ups and the Spearman correlation of the two objectives. The
shared statistics pass is timed separately (paid once per study). With ``--full-eval`` it also
times the evaluation an exact-mode trial runs (``run_main``: every evaluation language,
``eval_tokens`` and the task suite), to give the speed-up of ``mode=fast`` over ``mode=exact``
as the search runs them.

    .venv/bin/python benchmarks/search_fast_vs_exact.py                  # embedded Gemma 3 270M
    .venv/bin/python benchmarks/search_fast_vs_exact.py --tiny           # random tiny Llama
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from jobs import search as S
from pipeline import stages
from pipeline.config import REQUIRED_LANGS, Config
from pipeline.engine.blend import collect_language_stats, prune_from_stats
from pipeline.loading import load_model
from pipeline.models import DenseSnapshot
from pipeline.pruners import SparsityTarget, make_pruner


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gemma-3-270m", help="model (default: the embedded one)")
    p.add_argument("--tiny", action="store_true", help="a random tiny Llama instead (seconds)")
    p.add_argument("--target", default="sw")
    p.add_argument("--languages", default=",".join(REQUIRED_LANGS))
    p.add_argument("--method", default="wanda", choices=("wanda", "sparsegpt"))
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--n-blends", type=int, default=10)
    p.add_argument("--n-samples", type=int, default=16, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration window")
    p.add_argument("--eval-tokens", type=int, default=512, help="target-language ppl tokens")
    p.add_argument("--full-eval", action="store_true",
                   help="also time run_main's full evaluation (all languages + tasks) once")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def tiny_model_dir(root: Path) -> Path:
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = ByT5Tokenizer()
    cfg = LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=None, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    return root / "tiny"


def blends(pool: list[str], target: str, n: int, n_samples: int, seed: int) -> list[S.BlendPoint]:
    """Target-only, then distinct uniform-on-the-simplex points (by window counts)."""
    rng = np.random.default_rng(seed)
    out = [S.blend_from_raw(S.single(pool, target), n_samples)]
    seen = {out[0].label}
    while len(out) < n:
        sparse = rng.random(len(pool)) < 0.5  # also blends of a few languages
        raw = rng.exponential(size=len(pool)) * np.where(sparse, 0.0, 1.0)
        point = S.blend_from_raw(dict(zip(pool, raw.tolist())), n_samples)
        if point.label not in seen:
            seen.add(point.label)
            out.append(point)
    return out


def main() -> None:
    args = parse_args()
    tmp = tempfile.TemporaryDirectory()
    model = str(tiny_model_dir(Path(tmp.name))) if args.tiny else args.model
    cfg = Config.from_overrides({
        "model": model, "method": args.method, "sparsity": args.sparsity,
        "n_samples": args.n_samples, "seq_len": args.seq_len, "target_lang": args.target,
        "languages": args.languages, "device": args.device, "dtype": args.dtype,
        "seed": args.seed, "eval_langs": args.target, "eval_tokens": args.eval_tokens,
        "tasks": "",
    })
    pool = S.search_pool(cfg)
    objective = S.Objective({"ppl": 1.0}, args.target)
    loaded = load_model(cfg.model)
    snapshot = DenseSnapshot(loaded.model)
    target = SparsityTarget.from_pattern(args.sparsity, "unstructured")
    pruner = make_pruner(args.method)

    t0 = time.perf_counter()
    stats = {}
    for lang in pool:
        windows = stages.calibrate(cfg.replace(calib_lang=lang), loaded.tokenizer).windows
        stats[lang] = collect_language_stats(
            loaded.model, windows, lang, pruner, device=loaded.device,
            batch_size=cfg.prune.capture_batch_size)
    shared_s = time.perf_counter() - t0

    def evaluate() -> tuple[float, float]:
        t = time.perf_counter()
        report = stages.evaluate(cfg, loaded.model, loaded.tokenizer, loaded.device,
                                 loaded.max_length, progress=False)
        return objective.value(report.metrics()), time.perf_counter() - t

    rows = []
    for i, point in enumerate(blends(pool, args.target, args.n_blends, args.n_samples,
                                     args.seed)):
        t = time.perf_counter()
        prune_from_stats(loaded.model, stats, point.counts, pruner, target,
                         device=loaded.device)
        fast_prune = time.perf_counter() - t
        fast_obj, fast_eval = evaluate()
        snapshot.restore()
        t = time.perf_counter()
        cell = cfg.replace(calib_blend=point.label)
        stages.prune(cell, loaded.model, stages.calibrate(cell, loaded.tokenizer).windows,
                     loaded.device, progress=False)
        exact_prune = time.perf_counter() - t
        exact_obj, exact_eval = evaluate()
        full_eval = None
        if args.full_eval and i == 0:
            t = time.perf_counter()
            full = Config.from_overrides({"model": model, "device": args.device,
                                          "dtype": args.dtype})
            stages.evaluate(full, loaded.model, loaded.tokenizer, loaded.device,
                            loaded.max_length, progress=False)
            full_eval = time.perf_counter() - t
        snapshot.restore()
        rows.append((point, fast_obj, exact_obj, fast_prune, fast_eval, exact_prune, exact_eval,
                     full_eval))
        print(f"{i:>2} {point.short:<34} fast {fast_obj:10.4f} ({fast_prune + fast_eval:6.1f} s)"
              f"  exact {exact_obj:10.4f} ({exact_prune + exact_eval:6.1f} s)", flush=True)
    report(args, rows, shared_s, len(pool))


def report(args: argparse.Namespace, rows: list[tuple], shared_s: float, n_langs: int) -> None:
    from scipy.stats import spearmanr

    fast = [r[1] for r in rows]
    exact = [r[2] for r in rows]
    fast_s = float(np.mean([r[3] + r[4] for r in rows]))
    exact_s = float(np.mean([r[5] + r[6] for r in rows]))
    rho, p = spearmanr(fast, exact)
    print()
    print(f"model {args.model if not args.tiny else 'tiny random Llama'}, {args.method} "
          f"{args.sparsity:g}, target {args.target}, {n_langs} pool languages, "
          f"{args.n_samples} x {args.seq_len} calibration tokens, {args.eval_tokens} eval tokens")
    print(f"{'':<22}{'prune s':>10}{'eval s':>10}{'trial s':>10}")
    print(f"{'fast (mean)':<22}{np.mean([r[3] for r in rows]):>10.2f}"
          f"{np.mean([r[4] for r in rows]):>10.2f}{fast_s:>10.2f}")
    print(f"{'exact, same eval':<22}{np.mean([r[5] for r in rows]):>10.2f}"
          f"{np.mean([r[6] for r in rows]):>10.2f}{exact_s:>10.2f}")
    print(f"shared statistics pass (once per study): {shared_s:.1f} s")
    print(f"speed-up per trial, same evaluation: {exact_s / fast_s:.2f}x "
          f"(prune only: {np.mean([r[5] for r in rows]) / np.mean([r[3] for r in rows]):.2f}x)")
    full = next((r[7] for r in rows if r[7] is not None), None)
    if full is not None:
        exact_full = np.mean([r[5] for r in rows]) + full
        print(f"exact trial as mode=exact runs it (prune + run_main's full evaluation, "
              f"{full:.1f} s): {exact_full:.1f} s -> speed-up of mode=fast "
              f"{exact_full / fast_s:.1f}x")
    print(f"Spearman rho(fast, exact) over {len(rows)} blends: {rho:.3f} (p = {p:.3g})")


if __name__ == "__main__":
    main()
