"""langprune against llm-compressor's ``oneshot``: wall time, peak memory and agreement of the
masks and weights, for Wanda and SparseGPT, on the same model, windows and settings.

Both sides run back to back, each in a fresh subprocess (so ``ru_maxrss`` is the side's own
peak, and both see the same machine load): langprune with this venv's python, llm-compressor
with the python of its own venv (``benchmarks/setup_llmcompressor.sh``; llm-compressor pins
an older transformers, so it must never be a dependency of langprune). They exchange the
model (a saved Hugging Face folder), the calibration windows and the pruned weights as
safetensors files in a temporary folder.

Models: ``llama`` (the random ~125M Llama of ``_common``, random token windows) and ``gemma``
(the embedded default Gemma 3 270M, windows of the bundled English calibration text).

    bash benchmarks/setup_llmcompressor.sh                       # once: .venv-llmc
    .venv/bin/python benchmarks/prune_vs_llmcompressor.py --threads 1
    .venv/bin/python benchmarks/prune_vs_llmcompressor.py --models llama --methods wanda

Masks are compared as the positions that are exactly zero after pruning, on both sides, per
decoder-layer linear: IoU = |A and B| / |A or B|, reported as the minimum over modules and
pooled over all of them. ``max |dW|`` is the largest absolute weight difference.

Known differences of llm-compressor 0.14 that are not speed: its SparseGPT prunes every
entry ``<=`` the ``int(sparsity * numel)``-th smallest score of a block (one more weight per
block than the target, more on ties) where langprune prunes exactly ``floor(sparsity * numel)``;
its Wanda statistic is the mean, not the sum, of squared norms (same ranking up to rounding);
it keeps one statistic per linear where langprune shares one between q/k/v and gate/up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import (
    add_calib_args,
    add_llama_args,
    build_llama,
    cpu_seconds,
    load_avg,
    machine_line,
    peak_rss_mb,
    random_windows,
)

ROOT = Path(__file__).resolve().parent.parent
LLMC_SIDE = Path(__file__).resolve().parent / "_llmc_side.py"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_llama_args(p)
    add_calib_args(p)
    p.add_argument("--models", default="llama,gemma", help="comma list of llama, gemma")
    p.add_argument("--methods", default="wanda,sparsegpt")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT block size (both)")
    p.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT damping (both)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    p.add_argument("--true-sequential", action="store_true",
                   help="langprune prunes each layer's groups in order, in one pass per layer")
    p.add_argument("--noise-batch-size", type=int, default=4,
                   help="batch size of the extra langprune run that measures the rounding noise "
                        "floor of mask agreement (0 = skip it)")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per side, alternating langprune and llm-compressor; the table "
                        "shows each side's median run and lists all times")
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="skip timing the bare layer forwards (the floor under both tools)")
    p.add_argument("--llmc-malloc", choices=["default", "tuned"], default="default",
                   help="llm-compressor's allocator: glibc's defaults (as it ships), or the "
                        "settings langprune applies to itself (pipeline.host_memory), through "
                        "glibc's MALLOC_* variables")
    p.add_argument("--target", type=float, default=2.0,
                   help="speed-up over llm-compressor (CPU time) the summary lines check")
    p.add_argument("--llmc-python", default=str(ROOT / ".venv-llmc" / "bin" / "python"))
    p.add_argument("--side", choices=["langprune"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args()


# ---- preparing the shared inputs -------------------------------------------------------------


def prepare(model_name: str, args: argparse.Namespace, tmp: Path) -> tuple[Path, str]:
    """Write the model folder and ``windows.safetensors`` for ``model_name``; returns the
    model folder and a description."""
    from safetensors.torch import save_file

    if model_name == "llama":
        model = build_llama(args)
        folder = tmp / "model"
        model.save_pretrained(folder)
        windows = random_windows(args.n_samples, args.seq_len, args.vocab, args.seed)
        n = sum(p.numel() for p in model.parameters())
        desc = f"random Llama {n / 1e6:.1f}M, random token windows"
        del model
    elif model_name == "gemma":
        from transformers import AutoTokenizer

        from pipeline import stages
        from pipeline.config import Config, ModelCfg
        from pipeline.model_cache import EMBEDDED, embedded_folder
        from pipeline.paths import cache_dir

        folder, _ = embedded_folder(EMBEDDED[ModelCfg().model], cache_dir(""))
        tokenizer = AutoTokenizer.from_pretrained(folder)
        cfg = Config.from_overrides({"n_samples": args.n_samples, "seq_len": args.seq_len})
        windows = stages.calibrate(cfg, tokenizer)
        windows = getattr(windows, "windows", windows)
        desc = f"embedded Gemma 3 270M ({folder.name}), bundled '{cfg.calib.calib_lang}' text"
    else:
        raise SystemExit(f"unknown model {model_name!r}; known: llama, gemma")
    save_file({"input_ids": windows.contiguous()}, str(tmp / "windows.safetensors"))
    return folder, desc


# ---- the langprune side (a subprocess of this script) ----------------------------------------


def langprune_side(spec: dict) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from pipeline.engine import prune_layerwise
    from pipeline.host_memory import keep_freed_memory
    from pipeline.pruners import SparsityTarget, make_pruner

    allocator = "tuned" if keep_freed_memory() else "default"  # as the jobs do at start-up
    torch.set_num_threads(spec["threads"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).eval()
    windows = load_file(spec["windows"])["input_ids"]
    rss_before = peak_rss_mb()
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    result = prune_layerwise(
        model, windows, make_pruner(spec["method"], sparsegpt_blocksize=spec["blocksize"],
                                    sparsegpt_percdamp=spec["percdamp"]),
        SparsityTarget(spec["sparsity"]),
        device=torch.device("cpu"), batch_size=spec["batch_size"], progress=False,
        true_sequential=bool(spec.get("true_sequential", False)),
    )
    wall = time.perf_counter() - t0
    cpu = cpu_seconds() - cpu0
    weights = {
        name: mod.weight.detach().contiguous()
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}"
    }
    save_file(weights, spec["weights_out"])
    out = {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss_before,
           "threads": torch.get_num_threads(), "timings": result.timings,
           "allocator": allocator}
    if spec.get("floor"):  # after the timed prune, so it cannot disturb it
        out["floor"] = forward_floor(model, windows, spec["batch_size"])
    with open(spec["result_out"], "w") as fh:
        json.dump(out, fh)


def forward_floor(model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> dict:
    """Seconds of the decoder-layer forwards alone, on the same batches, without statistics,
    hooks or pruning: the floor under any layer-wise prune of this model.

    ``langprune``: langprune's own passes (each layer up to the input of its last linear, then
    once in full, the last layer excepted). ``two_full``: two full passes of every layer, as
    llm-compressor's sequential pipeline runs them (a calibration and a propagation pass).
    The (pruned) weights change no matmul's cost, so the pruned model times the same.
    """
    from pipeline import models
    from pipeline.engine import capture_layer_inputs, discover_input_groups
    from pipeline.engine.prune import _accumulate

    inputs = capture_layer_inputs(model, windows, batch_size, torch.device("cpu"))
    _, layers = models.find_decoder_layers(model)
    stops: dict[tuple, tuple[str, int]] = {}  # where the statistics pass ends, per layer code
    stats_s, full_s = [], []
    with torch.inference_mode():
        for i, layer in enumerate(layers):
            linears = models.find_linears(layer)
            key = (type(layer), tuple(linears))
            if key not in stops:
                groups = discover_input_groups(layer, linears, inputs[0], i)
                stops[key] = max(groups, key=lambda g: g.last_call).stop
            t0 = time.perf_counter()
            _accumulate(layer, inputs, i, {}, {}, stops[key])
            t1 = time.perf_counter()
            outputs = [inp.call(layer, i) for inp in inputs]
            stats_s.append(t1 - t0)
            full_s.append(time.perf_counter() - t1)
            for inp, hidden in zip(inputs, outputs, strict=True):
                inp.hidden_states = hidden
    return {"langprune": sum(stats_s) + sum(full_s[:-1]), "two_full": 2 * sum(full_s)}


# ---- orchestration ---------------------------------------------------------------------------


def _malloc_env() -> dict[str, str]:
    from pipeline import host_memory as hm

    return {"MALLOC_MMAP_THRESHOLD_": str(hm.MMAP_THRESHOLD),
            "MALLOC_TRIM_THRESHOLD_": str(hm.TRIM_THRESHOLD), "MALLOC_ARENA_MAX": "1"}


MALLOC_ENV = _malloc_env()


def run_side(side: str, python: str, spec: dict, tmp: Path, tag: str = "") -> dict:
    stem = f"{side}{tag}_{spec['method']}"
    spec_path = tmp / f"{stem}.json"
    spec = {**spec, "weights_out": str(tmp / f"{stem}.safetensors"),
            "result_out": str(tmp / f"{stem}_result.json")}
    spec_path.write_text(json.dumps(spec))
    if side == "langprune":
        cmd = [python, __file__, "--side", "langprune", "--spec", str(spec_path)]
    else:
        cmd = [python, str(LLMC_SIDE), str(spec_path)]
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if side != "langprune" and spec.get("llmc_malloc") == "tuned":
        env.update(MALLOC_ENV)
    log = tmp / f"{stem}.log"
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{side} side failed ({proc.returncode}):\n{tail}")
    result = json.loads(Path(spec["result_out"]).read_text())
    result["weights"] = spec["weights_out"]
    result["load"] = load_avg()
    return result


def matrix_check(args: argparse.Namespace, tmp: Path) -> str:
    """SparseGPT on one seeded matrix and Hessian on both sides: the two algorithms alone,
    without calibration pipelines (and their float32 rounding) in between."""
    from safetensors.torch import save_file

    from pipeline.pruners import sparsegpt_prune

    gen = torch.Generator().manual_seed(args.seed)
    rows, cols, tokens = args.intermediate, args.hidden, args.n_samples * args.seq_len
    mix = torch.eye(cols) + 0.2 * torch.randn(cols, cols, generator=gen)  # correlated inputs
    x = torch.randn(tokens, cols, generator=gen) @ mix
    w = 0.02 * torch.randn(rows, cols, generator=gen)
    save_file({"weight": w, "hessian": 2 * x.T @ x / args.n_samples}, str(tmp / "matrix.st"))
    ours = sparsegpt_prune(w, 2 * x.T @ x / args.n_samples, args.sparsity,
                           blocksize=args.blocksize, percdamp=args.percdamp)
    save_file({"weight": ours.weight.contiguous()}, str(tmp / "lp_matrix.st"))
    spec = {"mode": "matrix", "matrix": str(tmp / "matrix.st"), "threads": args.threads,
            "weights_out": str(tmp / "llmc_matrix.st"), "sparsity": args.sparsity,
            "blocksize": args.blocksize, "percdamp": args.percdamp}
    (tmp / "matrix.json").write_text(json.dumps(spec))
    proc = subprocess.run([args.llmc_python, str(LLMC_SIDE), str(tmp / "matrix.json")],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"llm-compressor matrix check failed:\n{proc.stderr[-3000:]}")
    c = compare(str(tmp / "lp_matrix.st"), str(tmp / "llmc_matrix.st"))
    return (f"SparseGPT, one {rows}x{cols} matrix, same Hessian ({tokens} correlated random "
            f"tokens): IoU {c['iou']:.5f}, identical {'yes' if c['identical'] else 'no'}, "
            f"max |dW| {c['max_dw']:.2e} (max |W| {c['max_w']:.2e}), sparsity "
            f"{c['sparsity_a']:.5f} / {c['sparsity_b']:.5f}")


def compare(a_path: str, b_path: str) -> dict[str, float]:
    """IoU of the zero patterns (min over modules and pooled) and max |dW|."""
    from safetensors.torch import load_file

    a, b = load_file(a_path), load_file(b_path)
    if set(a) != set(b):
        raise RuntimeError(f"module sets differ: {sorted(set(a) ^ set(b))[:5]}")
    inter = union = 0
    min_iou, max_dw, max_w = 1.0, 0.0, 0.0
    identical = 0
    per_module = {}
    for name in sorted(a):
        ma, mb = a[name] == 0, b[name] == 0
        i, u = int((ma & mb).sum()), int((ma | mb).sum())
        inter, union = inter + i, union + u
        per_module[name] = i / u if u else 1.0
        min_iou = min(min_iou, per_module[name])
        identical += bool(torch.equal(ma, mb))
        max_dw = max(max_dw, float((a[name] - b[name]).abs().max()))
        max_w = max(max_w, float(a[name].abs().max()))
    return {"iou": inter / union if union else 1.0, "min_iou": min_iou, "max_dw": max_dw,
            "max_w": max_w, "identical": identical, "modules": len(a),
            "sparsity_a": _sparsity(a), "sparsity_b": _sparsity(b),
            "worst": sorted(per_module.items(), key=lambda kv: kv[1])[:3]}


def _sparsity(weights: dict[str, torch.Tensor]) -> float:
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    return zeros / sum(w.numel() for w in weights.values())


def main() -> None:
    args = parse_args()
    if args.side:
        langprune_side(json.loads(Path(args.spec).read_text()))
        return
    if not Path(args.llmc_python).is_file():
        raise SystemExit(f"{args.llmc_python} missing: run bash benchmarks/setup_llmcompressor.sh")
    print(machine_line())
    print(f"calibration {args.n_samples} x {args.seq_len} tokens, batch {args.batch_size}, "
          f"sparsity {args.sparsity}, SparseGPT block {args.blocksize} damp {args.percdamp}, "
          f"threads {args.threads} per side; sides run back to back, each in a fresh process"
          f"{'; langprune true_sequential (one pass per layer)' if args.true_sequential else ''}")
    print("allocator: langprune tunes glibc's malloc for itself (pipeline.host_memory; "
          f"LANGPRUNE_KEEP_FREED_MEMORY=0 turns it off); llm-compressor {args.llmc_malloc}"
          f"{' (the same settings, as MALLOC_* variables)' if args.llmc_malloc == 'tuned' else ''}"
          "\n")
    if "sparsegpt" in args.methods.split(","):
        with tempfile.TemporaryDirectory(prefix="lp_vs_llmc_") as tmp_name:
            print(matrix_check(args, Path(tmp_name)) + "\n", flush=True)
    rows = []
    for model_name in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix="lp_vs_llmc_") as tmp_name:
            tmp = Path(tmp_name)
            folder, desc = prepare(model_name, args, tmp)
            print(f"[{model_name}] {desc}")
            for method in args.methods.split(","):
                spec = {"model_dir": str(folder), "windows": str(tmp / "windows.safetensors"),
                        "method": method, "sparsity": args.sparsity,
                        "blocksize": args.blocksize, "percdamp": args.percdamp,
                        "batch_size": args.batch_size, "threads": args.threads,
                        "true_sequential": args.true_sequential,
                        "llmc_malloc": args.llmc_malloc}
                lps, lcs = [], []
                for r in range(max(args.repeat, 1)):  # alternate, so drifts hit both sides
                    tag = f"_r{r}" if r else ""
                    lps.append(run_side("langprune", sys.executable,
                                        {**spec, "floor": args.floor}, tmp, tag=tag))
                    lcs.append(run_side("llmc", args.llmc_python, spec, tmp, tag=tag))
                lp, lc = median_run(lps), median_run(lcs)
                cmp = compare(lp["weights"], lc["weights"])
                if args.noise_batch_size:
                    # Same method, windows and settings; only the batching (so the order of
                    # float32 sums) differs: how far masks move from rounding alone.
                    nb = {**spec, "batch_size": args.noise_batch_size}
                    lp2 = run_side("langprune", sys.executable, nb, tmp, tag="_noise")
                    cmp["noise"] = compare(lp["weights"], lp2["weights"])
                    cmp["noise"]["batches"] = (args.batch_size, args.noise_batch_size)
                rows.append((model_name, method, lp, lc, cmp))
                print_row(*rows[-1], header=len(rows) == 1)
    print("\nIoU over positions exactly zero after pruning (langprune vs llm-compressor); "
          "'same' = modules whose zero patterns are identical.")
    print(f"cpu s = user + system CPU seconds of the prune call ({args.threads} thread(s) per "
          "side): unlike wall time it does not grow when other jobs take the cores.")
    if args.floor:
        print("floor = the same decoder-layer forwards timed bare (no hooks, statistics or "
              "pruning) in each langprune run after its prune; 'langprune passes': each layer "
              "up to its last linear's input, then in full (last layer excepted); 'two full "
              "passes': what llm-compressor's sequential pipeline runs.")
    for model_name, method, lp, lc, _ in rows:
        wall, cpu = lc["wall_s"] / lp["wall_s"], lc["cpu_s"] / lp["cpu_s"]
        print(f"target {args.target:g}x llm-compressor, {model_name} {method} "
              f"(langprune allocator {lp.get('allocator', '?')}, llm-compressor "
              f"{args.llmc_malloc}): {'met' if cpu >= args.target else 'MISSED'} on CPU time "
              f"({cpu:.2f}x; wall {wall:.2f}x)")


def median_run(runs: list[dict]) -> dict:
    """The run with the median wall time (the lower middle one for an even count), with the
    wall and CPU times of all runs attached."""
    ordered = sorted(runs, key=lambda r: r["wall_s"])
    pick = dict(ordered[(len(ordered) - 1) // 2])
    pick["all_wall_s"] = [r["wall_s"] for r in runs]
    pick["all_cpu_s"] = [r["cpu_s"] for r in runs]
    return pick


def print_row(model: str, method: str, lp: dict, lc: dict, cmp: dict, header: bool) -> None:
    if header:
        head = (f"{'model':<6} {'method':<9} {'lp s':>7} {'llmc s':>7} {'speedup':>7} "
                f"{'lp cpu s':>8} {'llmc cpu s':>10} {'cpu ratio':>9} "
                f"{'lp RSS MiB':>10} {'llmc RSS MiB':>12} {'IoU':>8} {'min IoU':>8} "
                f"{'same':>7} {'max |dW|':>9} {'max |W|':>8} {'sparsity lp/llmc':>17} "
                f"{'load':>15}")
        print(head)
        print("-" * len(head))
    same = f"{cmp['identical']}/{cmp['modules']}"
    print(f"{model:<6} {method:<9} {lp['wall_s']:7.2f} {lc['wall_s']:7.2f} "
          f"{lc['wall_s'] / lp['wall_s']:6.2f}x {lp['cpu_s']:8.1f} {lc['cpu_s']:10.1f} "
          f"{lc['cpu_s'] / lp['cpu_s']:8.2f}x {lp['peak_rss_mb']:10.0f} "
          f"{lc['peak_rss_mb']:12.0f} {cmp['iou']:8.5f} {cmp['min_iou']:8.5f} {same:>7} "
          f"{cmp['max_dw']:9.2e} {cmp['max_w']:8.2e} "
          f"{cmp['sparsity_a']:8.4f}/{cmp['sparsity_b']:.4f} {lc['load']:>15}", flush=True)
    parts = ", ".join(f"{k} {v:.1f}" for k, v in lp.get("timings", {}).items())
    print(f"{'':<17}langprune seconds: {parts}", flush=True)
    if "floor" in lp:
        fl = lp["floor"]
        print(f"{'':<17}floor (bare forwards, same run): langprune passes {fl['langprune']:.2f} s, "
              f"two full passes {fl['two_full']:.2f} s; langprune = floor + "
              f"{lp['wall_s'] - fl['langprune']:.2f} s, llm-compressor = two full passes + "
              f"{lc['wall_s'] - fl['two_full']:.2f} s; half of llm-compressor = "
              f"{lc['wall_s'] / 2:.2f} s", flush=True)
    if len(lp.get("all_wall_s", [])) > 1:
        for side, run in (("langprune", lp), ("llm-compressor", lc)):
            walls = " ".join(f"{w:.2f}" for w in run["all_wall_s"])
            cpus = " ".join(f"{c:.1f}" for c in run["all_cpu_s"])
            print(f"{'':<17}{side} runs, wall s: {walls}; cpu s: {cpus}", flush=True)
    if "noise" in cmp:
        nz = cmp["noise"]
        b1, b2 = nz["batches"]
        print(f"{'':<17}noise floor, langprune batch {b1} vs {b2}: IoU {nz['iou']:.5f}, "
              f"min {nz['min_iou']:.5f}, same {nz['identical']}/{nz['modules']}, "
              f"max |dW| {nz['max_dw']:.2e}", flush=True)
    if cmp["min_iou"] < 1.0:
        worst = ", ".join(f"{name} {iou:.4f}" for name, iou in cmp["worst"])
        print(f"{'':<17}lowest IoU: {worst}", flush=True)


if __name__ == "__main__":
    main()
