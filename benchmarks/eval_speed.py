"""Perplexity evaluation speed: :func:`pipeline.evaluate.perplexity.evaluate_perplexity`
against a plain batch-1 Hugging Face loop (``model(input_ids, labels=input_ids)``) on the
same windows, in tokens/s, and a check that both give the same perplexity. Prints a table;
asserts nothing.

    .venv/bin/python benchmarks/eval_speed.py --threads 1          # embedded Gemma 3 270M

The text is the bundled FLORES devtest of ``--lang``, cut into the windows of the
``token_nonoverlap_v1`` definition (start token + ``seq_len - 1`` text tokens); the plain loop
runs exactly those windows one at a time and sums ``loss * (len - 1)``, so the two totals
must agree to float32 rounding.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from _common import load_avg, machine_line

from pipeline.config import ModelCfg
from pipeline.data.sources import load_eval_sentences
from pipeline.evaluate.perplexity import (
    cut_windows,
    evaluate_perplexity,
    select_text,
    start_token_id,
)
from pipeline.loading import load_model

PPL_RTOL = 1e-4  # float32 logits summed in different orders


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=ModelCfg().model, help="model (default: the embedded one)")
    p.add_argument("--lang", default="en")
    p.add_argument("--source", default="flores")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--tokens", type=int, default=4096, help="token budget (whole sentences)")
    p.add_argument("--batch-sizes", default="1,4", help="evaluate_perplexity batch sizes")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    return p.parse_args()


@torch.inference_mode()
def plain_loop(model: torch.nn.Module, windows: list[list[int]]) -> float:
    """Total NLL (nats) the textbook way: one window per forward, full logits, HF's loss."""
    total = 0.0
    for w in windows:
        ids = torch.tensor([w])
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        total += float(loss) * (len(w) - 1)
    return total


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    loaded = load_model(ModelCfg(model=args.model, device="cpu"))
    model, tok = loaded.model, loaded.tokenizer
    sentences = load_eval_sentences(args.source, args.lang)
    _, ids = select_text(tok, sentences, args.tokens)
    windows = cut_windows(ids, args.seq_len, start_token_id(tok))
    print(f"model: {loaded.source}; {args.source} {args.lang}: {len(ids)} tokens in "
          f"{len(windows)} windows of <= {args.seq_len}\n")
    head = f"{'evaluator':<34} {'seconds':>8} {'tokens/s':>9} {'ppl':>10} {'load':>15}"
    print(head + "\n" + "-" * len(head))
    # Warm-up (one window) so neither side pays first-call allocation costs.
    plain_loop(model, windows[:1])
    t0 = time.perf_counter()
    nll = plain_loop(model, windows)
    plain_s = time.perf_counter() - t0
    plain_ppl = math.exp(nll / len(ids))
    print(f"{'plain HF loop, batch 1':<34} {plain_s:8.2f} {len(ids) / plain_s:9.0f} "
          f"{plain_ppl:10.4f} {load_avg():>15}")
    verdicts = []
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        t0 = time.perf_counter()
        res = evaluate_perplexity(model, tok, sentences, seq_len=args.seq_len,
                                  token_budget=args.tokens, batch_size=bs, device="cpu",
                                  progress=False)
        s = time.perf_counter() - t0
        print(f"{f'evaluate_perplexity, batch {bs}':<34} {s:8.2f} {res.n_tokens / s:9.0f} "
              f"{res.ppl:10.4f} {load_avg():>15}")
        rel = abs(res.ppl - plain_ppl) / plain_ppl
        verdicts.append(f"batch {bs}: {plain_s / s:.2f}x the plain loop's tokens/s; ppl "
                        f"relative difference {rel:.1e} ({'same' if rel <= PPL_RTOL else 'DIFFERS'}"
                        f" at rtol {PPL_RTOL:g}); tokens {res.n_tokens} vs {len(ids)}")
    print()
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
