"""Helpers shared by the benchmark scripts: the random ~100M Llama, seeded calibration
windows, the machine's measured matmul rate, the analytic FLOP count of a prune, peak
resident memory and a one-line description of the machine and its load.

Benchmarks are scripts (``.venv/bin/python benchmarks/<name>.py``); Python puts this folder
on ``sys.path`` for them, so they import this module as ``_common``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import resource
import time
from collections.abc import Mapping

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

# The default random Llama: ~125M parameters (75M in 12 decoder layers, 49M in the untied
# embeddings and lm_head). Wide enough that matmuls, not Python, dominate a prune.
LLAMA_DEFAULTS: Mapping[str, int] = {
    "hidden": 768, "layers": 12, "intermediate": 2048, "heads": 12, "kv_heads": 4,
    "vocab": 32000,
}


def add_llama_args(p: argparse.ArgumentParser) -> None:
    """Add the random-Llama shape flags (``--hidden`` ... ``--vocab``) and ``--seed``."""
    for key, value in LLAMA_DEFAULTS.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    p.add_argument("--seed", type=int, default=0)


def add_calib_args(p: argparse.ArgumentParser, n_samples: int = 16, seq_len: int = 256) -> None:
    """Add ``--n-samples``, ``--seq-len`` and ``--batch-size`` (windows per forward)."""
    p.add_argument("--n-samples", type=int, default=n_samples)
    p.add_argument("--seq-len", type=int, default=seq_len)
    p.add_argument("--batch-size", type=int, default=8)


def build_llama(args: argparse.Namespace) -> LlamaForCausalLM:
    """The seeded random Llama described by ``args`` (see :func:`add_llama_args`), eval mode."""
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(getattr(args, "seq_len", 2048), 2048),
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(cfg).eval()


def random_windows(n: int, seq_len: int, vocab: int, seed: int) -> torch.Tensor:
    """Seeded uniform random token ids ``[n, seq_len]`` (int64)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq_len), generator=gen)


def sync(device: torch.device) -> None:
    """Wait for queued device work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(
    device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048,
    seconds: float = 0.5, trials: int = 5,
) -> float:
    """Measured ``n x n`` matmul rate in GFLOP/s (TF32 as torch's defaults leave it: off).

    The best of ``trials`` runs of ``seconds`` each: on a shared machine the best run is the
    closest to what the hardware can do, which is what a roofline compares against.
    """
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    best = 0.0
    for _ in range(trials):
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            reps += 1
            if device.type == "cuda" and reps % 50:
                continue
            sync(device)
        sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9)
    return best


# ---- analytic FLOPs of a prune ---------------------------------------------------------------

# Linears of a Llama layer that own a statistic when q/k/v and gate/up share one.
_SHARED_OWNERS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


def _linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}


def stat_dims(layer: nn.Module, shared: bool) -> list[int]:
    """Input dims of one Llama layer's statistics (q/k/v and gate/up share one when shared)."""
    lin = _linears(layer)
    if not shared:
        return [m.in_features for m in lin.values()]
    return [lin[name].in_features for name in _SHARED_OWNERS]


def prune_flops(
    model: LlamaForCausalLM, method: str, tokens: int, seq_len: int, n_batches: int,
    shared: bool = True, blocksize: int = 128,
) -> dict[str, float]:
    """Analytic useful work of one layer-wise prune, by part, in FLOP.

    Parts: ``forward`` (one discovery forward of one batch, a statistics pass per layer,
    propagation for all but the last layer: 2 FLOP per weight per token plus causal
    attention), ``statistics`` (Wanda: squares and sums, 3 per input element; SparseGPT: the
    X^T X updates, counted as the symmetric product's n d (d + 1) since only one triangle is
    needed), ``factor`` (SparseGPT: the Cholesky factor of H^-1, at least 2/3 d^3: a
    Cholesky and a triangular inverse; the paper's three LAPACK calls do 4/3 d^3) and
    ``update`` (SparseGPT: in-block rank-1 updates ~ rows * blocksize * cols and lazy block
    updates ~ rows * cols^2). Sorting and masking are not counted, so a fraction of peak
    computed from this is a lower bound on efficiency.
    """
    layers = model.model.layers
    n_layers = len(layers)
    lin = _linears(layers[0])
    params = sum(m.in_features * m.out_features for m in lin.values())
    attn = 4 * tokens * seq_len * model.config.hidden_size / 2  # causal QK^T and AV
    passes = 1 / n_batches + n_layers + (n_layers - 1)
    dims = stat_dims(layers[0], shared)
    out = {"forward": passes * (2 * params * tokens + attn)}
    if method == "sparsegpt":
        out["statistics"] = n_layers * sum(tokens * d * (d + 1) for d in dims)
        out["factor"] = n_layers * sum(2 / 3 * d**3 for d in dims)
        out["update"] = n_layers * sum(
            m.out_features * m.in_features * (m.in_features + blocksize) for m in lin.values()
        )
    else:
        out["statistics"] = n_layers * sum(3 * tokens * d for d in dims)
    return out


# ---- memory and machine ----------------------------------------------------------------------


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def current_rss_mb() -> float:
    """Current resident memory of this process, in MiB (from /proc/self/statm)."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def load_avg() -> str:
    """The 1/5/15-minute load averages, as ``uptime`` prints them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_line() -> str:
    """Date, CPU, cores, RAM, torch version and threads, and the current load average."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{now}; {_cpu_model()}, nproc {os.cpu_count()}, {_ram_gib():.0f} GiB RAM; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"load average {load_avg()}"
    )
