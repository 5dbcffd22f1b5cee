"""Roofline of a prune: the machine's measured float32 and bfloat16 matmul rates, the FLOPs of a
layer-wise prune of the random ~125M Llama by part, and the fraction of the float32 rate
each part reaches. Prints a table; asserts nothing.

    .venv/bin/python benchmarks/roofline.py --threads 1          # the RESULTS.md setting
    .venv/bin/python benchmarks/roofline.py --device cuda        # on a GPU

FLOPs are analytic (``_common.prune_flops``): layer forwards (one discovery forward, a
statistics pass per layer, propagation for all but the last), statistic accumulation,
SparseGPT's Cholesky/inverse/Cholesky per statistic and its OBS updates. Time is split as the
engine reports it: ``capture + statistics + propagate`` run the forwards and statistics,
``prune`` runs the factorisations, updates and mask selection (selection is not counted, so
the prune fraction is a lower bound). Target (issue 7): the whole prune >= 1/3 of the float32
rate measured with the same threads.
"""

from __future__ import annotations

import argparse

import torch
from _common import (
    add_calib_args,
    add_llama_args,
    build_llama,
    machine_line,
    matmul_gflops,
    prune_flops,
    random_windows,
    sync,
)

from pipeline.engine import prune_layerwise
from pipeline.models import resolve_device
from pipeline.pruners import SparsityTarget, make_pruner

TARGET_FRACTION = 1 / 3


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_llama_args(p)
    add_calib_args(p)
    p.add_argument("--methods", default="wanda,sparsegpt")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(machine_line())
    fp32 = matmul_gflops(device, torch.float32)
    bf16 = matmul_gflops(device, torch.bfloat16)
    print(f"matmul 2048^3 on {device}: float32 {fp32:.1f} GFLOP/s, bfloat16 {bf16:.1f} GFLOP/s "
          f"({torch.get_num_threads()} threads)")
    base = build_llama(args)
    n_params = sum(p.numel() for p in base.parameters())
    windows = random_windows(args.n_samples, args.seq_len, args.vocab, args.seed)
    tokens, n_batches = windows.numel(), -(-args.n_samples // args.batch_size)
    print(f"model: random Llama {n_params / 1e6:.1f}M, calibration {args.n_samples} x "
          f"{args.seq_len} tokens, batch {args.batch_size}, float32\n")
    head = (f"{'method':<10} {'part':<28} {'GFLOP':>8} {'seconds':>8} {'GFLOP/s':>8} "
            f"{'of fp32':>8}")
    print(head)
    print("-" * len(head))
    verdicts = []
    for method in args.methods.split(","):
        model = build_llama(args)
        sync(device)
        res = prune_layerwise(model, windows, make_pruner(method), SparsityTarget(args.sparsity),
                              device=device, batch_size=args.batch_size, progress=False)
        flops = prune_flops(model, method, tokens, args.seq_len, n_batches)
        t = res.timings
        fwd_s = t.get("capture", 0) + t.get("statistics", 0) + t.get("propagate", 0)
        parts = [("forwards + statistics", flops["forward"] + flops["statistics"], fwd_s)]
        if method == "sparsegpt":
            parts.append(("factor + OBS updates", flops["factor"] + flops["update"],
                          t.get("prune", 0)))
        else:
            parts.append(("mask selection (no FLOPs)", 0.0, t.get("prune", 0)))
        parts.append(("whole prune", sum(flops.values()), res.seconds))
        for name, f, s in parts:
            rate = f / s / 1e9 if s else 0.0
            print(f"{method:<10} {name:<28} {f / 1e9:8.1f} {s:8.2f} {rate:8.1f} "
                  f"{rate / fp32:7.1%}")
        frac = sum(flops.values()) / res.seconds / 1e9 / fp32
        verdicts.append(f"{method}: {frac:.1%} of the float32 rate -> target >= "
                        f"{TARGET_FRACTION:.1%} {'met' if frac >= TARGET_FRACTION else 'MISSED'}")
        del model
    print()
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
