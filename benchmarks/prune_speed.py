"""Speed of the full layer-wise prune: wall time, tokens/s, GFLOP/s against the machine's
measured float32 matmul rate, and the speed-up of shared statistics (q/k/v, gate/up) over one
statistic per module. Prints a table; asserts nothing.

The model is a random-initialised Llama built here (about 100M parameters by default), the
calibration set random token windows, both seeded, so runs are comparable across machines.

    .venv/bin/python benchmarks/prune_speed.py                     # ~100M Llama, CPU/GPU auto
    .venv/bin/python benchmarks/prune_speed.py --hidden 2048 --layers 16 --intermediate 5632 \\
        --n-samples 128 --seq-len 2048 --device cuda                # a ~1B model on a GPU

GFLOP/s are from an analytic count of the useful work (layer forwards, statistics, and for
SparseGPT the Cholesky factorisations and OBS updates); sorting and other non-matmul work is
not counted, so the fraction of peak is a lower bound on efficiency.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from _common import (
    add_calib_args,
    add_llama_args,
    build_llama,
    matmul_gflops,
    prune_flops,
    random_windows,
    sync,
)
from transformers import LlamaForCausalLM

from pipeline.engine import prune_layerwise
from pipeline.models import resolve_device, resolve_dtype
from pipeline.pruners import SparsityTarget, make_pruner


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_llama_args(p)
    add_calib_args(p)
    p.add_argument("--methods", default="wanda,sparsegpt")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    p.add_argument("--no-unshared", action="store_true", help="skip the unshared-statistics runs")
    return p.parse_args()


def estimate_gflop(model: LlamaForCausalLM, method: str, tokens: int, seq_len: int,
                   n_batches: int, shared: bool) -> float:
    """Analytic useful work of one layer-wise prune, in GFLOP (see ``_common.prune_flops``)."""
    return sum(prune_flops(model, method, tokens, seq_len, n_batches, shared).values()) / 1e9


def run_one(base: LlamaForCausalLM, windows: torch.Tensor, method: str, shared: bool,
            args: argparse.Namespace, device: torch.device):
    model = copy.deepcopy(base)
    sync(device)
    t0 = time.perf_counter()
    result = prune_layerwise(model, windows, make_pruner(method), SparsityTarget(args.sparsity),
                             device=device,
                             batch_size=args.batch_size, progress=False,
                             share_statistics=shared)
    sync(device)
    wall = time.perf_counter() - t0
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result, wall


def main() -> None:
    args = parse_args()
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = build_llama(args).to(dtype)
    n_params = sum(p.numel() for p in base.parameters())
    windows = random_windows(args.n_samples, args.seq_len, args.vocab, args.seed)
    peak = matmul_gflops(device)
    tokens = windows.numel()
    n_batches = -(-args.n_samples // args.batch_size)
    print(f"model: random Llama, {n_params / 1e6:.1f}M parameters ({args.layers} layers, hidden "
          f"{args.hidden}, MLP {args.intermediate}), dtype {args.dtype}, device {device}")
    print(f"calibration: {args.n_samples} x {args.seq_len} = {tokens} tokens, batch "
          f"{args.batch_size}; torch threads {torch.get_num_threads()}")
    print(f"measured float32 matmul rate: {peak:.1f} GFLOP/s\n")
    header = (f"{'method':<10} {'stats':<9} {'wall s':>8} {'tokens/s':>10} {'GFLOP':>8} "
              f"{'GFLOP/s':>9} {'% peak':>7} {'capture':>8} {'stats s':>8} {'prune s':>8} "
              f"{'propag s':>9}")
    print(header)
    print("-" * len(header))
    for method in args.methods.split(","):
        walls = {}
        for shared in (True, False) if not args.no_unshared else (True,):
            result, wall = run_one(base, windows, method, shared, args, device)
            gflop = estimate_gflop(base, method, tokens, args.seq_len, n_batches, shared)
            t = result.timings
            walls[shared] = (wall, t.get("statistics", 0) + t.get("prune", 0))
            print(f"{method:<10} {'shared' if shared else 'separate':<9} {wall:8.2f} "
                  f"{tokens / wall:10.0f} {gflop:8.1f} {gflop / wall:9.1f} "
                  f"{100 * gflop / wall / peak:6.1f}% {t.get('capture', 0):8.2f} "
                  f"{t.get('statistics', 0):8.2f} {t.get('prune', 0):8.2f} "
                  f"{t.get('propagate', 0):9.2f}")
        if False in walls:
            (w_sh, sp_sh), (w_sep, sp_sep) = walls[True], walls[False]
            print(f"{'':<10} shared statistics: {w_sep / w_sh:.2f}x faster overall, "
                  f"{sp_sep / sp_sh:.2f}x in statistics + prune ({result.n_statistics} -> "
                  f"{4 * args.layers} statistics)")
    print("\nGFLOP counts layer forwards, statistics and (SparseGPT) factorisations + OBS updates.")


if __name__ == "__main__":
    main()
