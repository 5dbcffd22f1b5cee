"""Where one decoder-layer forward of the random ~125M Llama spends its time: the per-batch
forward time, the operators by self time (``torch.profiler``) and the rate of ``aten::mm``
against the machine's matmul rate; with ``--compile`` also ``torch.compile`` of the layer
(compile time and per-batch time). Prints a table; asserts nothing.

    .venv/bin/python benchmarks/layer_forward.py --threads 1            # the RESULTS.md setting
    .venv/bin/python benchmarks/layer_forward.py --threads 1 --compile

This is the evidence for the floor under Wanda's 2x target in RESULTS.md: the layer forwards
both tools run are matmul-bound at close to the machine's rate.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import (
    add_calib_args,
    add_llama_args,
    build_llama,
    machine_line,
    matmul_gflops,
    random_windows,
)
from torch.profiler import ProfilerActivity, profile

from pipeline.engine import LayerInput, capture_layer_inputs


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_llama_args(p)
    add_calib_args(p)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    p.add_argument("--repeat", type=int, default=15, help="timed passes over all batches")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(layer)")
    return p.parse_args()


def per_batch_s(layer: torch.nn.Module, inputs: list[LayerInput], repeat: int) -> float:
    """Mean seconds of one batch through ``layer`` (after one warm-up pass)."""
    for inp in inputs:
        inp.call(layer, 0)
    t = time.perf_counter()
    for _ in range(repeat):
        for inp in inputs:
            inp.call(layer, 0)
    return (time.perf_counter() - t) / (repeat * len(inputs))


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    rate = matmul_gflops(torch.device("cpu"), torch.float32)
    model = build_llama(args)
    windows = random_windows(args.n_samples, args.seq_len, args.vocab, args.seed)
    inputs = capture_layer_inputs(model, windows, args.batch_size, torch.device("cpu"))
    layer = model.model.layers[0]
    tokens = args.batch_size * args.seq_len
    linear_macs = sum(m.in_features * m.out_features for m in layer.modules()
                      if isinstance(m, torch.nn.Linear))
    print(f"random Llama layer 0, {len(inputs)} batches of {args.batch_size} x {args.seq_len} "
          f"tokens, float32, {torch.get_num_threads()} thread(s); matmul 2048^3: "
          f"{rate:.1f} GFLOP/s")
    with torch.inference_mode():
        eager = per_batch_s(layer, inputs, args.repeat)
        print(f"eager forward: {eager * 1e3:.1f} ms per batch")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for inp in inputs:
                inp.call(layer, 0)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        print(f"{'operator':<52} {'self ms':>9} {'share':>7} {'calls':>6}")
        for e in events[:8]:
            print(f"{e.key:<52} {e.self_cpu_time_total / 1e3:9.1f} "
                  f"{e.self_cpu_time_total / total:7.1%} {e.count:6d}")
        mm = next((e for e in events if e.key == "aten::mm"), None)
        if mm is not None:
            gflop = 2 * tokens * linear_macs * len(inputs) / 1e9
            mm_rate = gflop / (mm.self_cpu_time_total / 1e6)
            print(f"aten::mm: {gflop:.1f} GFLOP in {mm.self_cpu_time_total / 1e3:.0f} ms = "
                  f"{mm_rate:.1f} GFLOP/s, {mm_rate / rate:.0%} of the matmul rate; everything "
                  f"else: {1 - mm.self_cpu_time_total / total:.0%} of the self time")
        if args.compile:
            t = time.perf_counter()
            compiled = torch.compile(layer)
            inputs[0].call(compiled, 0)
            print(f"torch.compile: {time.perf_counter() - t:.1f} s to compile; "
                  f"{per_batch_s(compiled, inputs, args.repeat) * 1e3:.1f} ms per batch "
                  f"(eager again: {per_batch_s(layer, inputs, args.repeat) * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
