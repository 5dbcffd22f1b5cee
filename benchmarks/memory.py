"""Peak resident memory of pruning the random ~125M Llama, with and without ``offload``,
against model bytes + one layer's activations. Prints a table; asserts nothing.

Each configuration (method x offload) runs in a fresh subprocess of this script: it imports
torch and transformers, builds the model and the windows, resets the kernel's peak-RSS
counter (``/proc/self/clear_refs`` 5, which resets ``ru_maxrss`` too), prunes, and reads
``ru_maxrss``. The reported overhead is that peak minus the RSS before the model was built
(interpreter, torch, transformers), compared with

    budget = model bytes + one layer's activations

where one layer's activations are the hidden states of all calibration windows at one
layer (the engine keeps exactly one such set alive as it walks down the stack) plus the
working set of one batch's forward through one layer (q, k, v, o, the three MLP tensors and
the attention scores). Target (issue 7): peak <= 1.3 x budget.

    .venv/bin/python benchmarks/memory.py --threads 1

On a CPU-only machine ``offload`` keeps the layers on the CPU and moves each to the compute
device, which is the CPU as well, so both configurations hold the same tensors; the point
of the CPU figures is that the engine adds little beyond the model. Where CUDA is present,
``--device cuda`` also reports ``torch.cuda.max_memory_allocated``: with offload, the GPU
holds the embeddings and one decoder layer, without it the whole model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
from _common import (
    add_calib_args,
    add_llama_args,
    build_llama,
    current_rss_mb,
    load_avg,
    machine_line,
    peak_rss_mb,
    random_windows,
)

TARGET_RATIO = 1.3
MIB = 2**20


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_llama_args(p)
    add_calib_args(p)
    p.add_argument("--methods", default="wanda,sparsegpt")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", help=argparse.SUPPRESS)  # "method,offload" in a subprocess
    return p.parse_args()


def activation_bytes(args: argparse.Namespace) -> int:
    """One layer's activations (float32): all windows' hidden states + one batch's forward."""
    head_dim = args.hidden // args.heads
    hidden_set = args.n_samples * args.seq_len * args.hidden
    b, s = min(args.batch_size, args.n_samples), args.seq_len
    qkvo = 2 * args.hidden + 2 * args.kv_heads * head_dim
    per_batch = b * s * (qkvo + 3 * args.intermediate) + b * args.heads * s * s
    return 4 * (hidden_set + per_batch)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def child(args: argparse.Namespace) -> None:
    from pipeline.engine import prune_layerwise
    from pipeline.models import resolve_device
    from pipeline.pruners import SparsityTarget, make_pruner

    method, offload = args.child.split(",")
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    base_rss = current_rss_mb()
    model = build_llama(args)
    windows = random_windows(args.n_samples, args.seq_len, args.vocab, args.seed)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    after_build = current_rss_mb()
    build_peak = peak_rss_mb()
    reset = _reset_peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prune_layerwise(model, windows, make_pruner(method), SparsityTarget(args.sparsity),
                    device=device,
                    offload=offload == "1", batch_size=args.batch_size, progress=False)
    out = {
        "base_rss": base_rss, "after_build": after_build, "build_peak": build_peak,
        "prune_peak": peak_rss_mb(), "reset": reset, "model_mib": model_bytes / MIB,
        "gpu_peak": torch.cuda.max_memory_allocated(device) / MIB
        if device.type == "cuda" else None,
    }
    print("RESULT " + json.dumps(out))


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return
    print(machine_line())
    act = activation_bytes(args) / MIB
    print(f"random Llama (hidden {args.hidden}, {args.layers} layers, MLP {args.intermediate}), "
          f"calibration {args.n_samples} x {args.seq_len}, batch {args.batch_size}, float32, "
          f"device {args.device}, {args.threads} thread(s); one layer's activations "
          f"{act:.1f} MiB\n")
    head = (f"{'method':<10} {'offload':<8} {'base':>6} {'model':>7} {'budget':>7} "
            f"{'after build':>11} {'prune peak':>10} {'overhead':>9} {'ratio':>6} "
            f"{'GPU peak':>9} {'load':>15}")
    print(head + "\n" + "-" * len(head))
    verdicts = []
    passthrough = [a for a in sys.argv[1:]]
    for method in args.methods.split(","):
        for offload in ("0", "1"):
            cmd = [sys.executable, __file__, *passthrough, "--child", f"{method},{offload}"]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                raise RuntimeError(f"child {method},{offload} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(line[0][len("RESULT "):])
            budget = r["model_mib"] + act
            overhead = r["prune_peak"] - r["base_rss"]
            ratio = overhead / budget
            gpu = f"{r['gpu_peak']:9.0f}" if r["gpu_peak"] is not None else f"{'-':>9}"
            print(f"{method:<10} {'yes' if offload == '1' else 'no':<8} {r['base_rss']:6.0f} "
                  f"{r['model_mib']:7.0f} {budget:7.0f} {r['after_build']:11.0f} "
                  f"{r['prune_peak']:10.0f} {overhead:9.0f} {ratio:6.2f} {gpu} "
                  f"{load_avg():>15}", flush=True)
            if not r["reset"]:
                print("  (peak counter could not be reset: prune peak includes the build)")
            verdicts.append(f"{method} offload={offload == '1'}: {ratio:.2f}x budget -> target "
                            f"<= {TARGET_RATIO}x {'met' if ratio <= TARGET_RATIO else 'MISSED'}")
    print("\nMiB throughout. base = RSS after importing torch/transformers (before the model); "
          "overhead = prune peak - base; ratio = overhead / budget.")
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
