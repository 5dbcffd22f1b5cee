"""The llm-compressor side of ``prune_vs_llmcompressor.py``; runs in llm-compressor's own venv.

Usage (done by the orchestrating script, never by hand)::

    .venv-llmc/bin/python benchmarks/_llmc_side.py SPEC.json

SPEC.json names a saved Hugging Face model folder, a safetensors file with the calibration
windows (``input_ids``, ``[n, seq_len]``), the method and its settings, and where to write
the pruned decoder-layer weights (safetensors) and a result JSON (wall time of ``oneshot``,
peak RSS). This file imports nothing from langprune: this venv has llm-compressor's
transformers, not langprune's.
"""

from __future__ import annotations

import json
import resource
import sys
import time

import torch


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _tokenizer():
    """A do-nothing tokenizer: oneshot insists on a processor, the windows are already ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
        unk_token="[UNK]", pad_token="[UNK]",
    )


def _recipe(spec: dict):
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    common = {
        "sparsity": spec["sparsity"], "mask_structure": spec.get("mask_structure", "0:0"),
        "targets": ["Linear"], "ignore": ["re:.*lm_head"],
    }
    if spec["method"] == "wanda":
        return [WandaPruningModifier(**common)]
    if spec["method"] == "sparsegpt":
        return [SparseGPTModifier(
            block_size=spec["blocksize"], dampening_frac=spec["percdamp"], **common
        )]
    raise SystemExit(f"unknown method {spec['method']!r}")


def matrix(spec: dict) -> None:
    """One weight matrix and one Hessian, straight through llm-compressor's sparsify_weight."""
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight
    from safetensors.torch import load_file, save_file

    data = load_file(spec["matrix"])
    rows, cols = data["weight"].shape
    linear = torch.nn.Linear(cols, rows, bias=False)
    linear.weight.data = data["weight"].clone()
    _, weight = sparsify_weight(
        linear, {linear: data["hessian"].clone()}, spec["sparsity"], 0, 0,
        spec["blocksize"], spec["percdamp"], False,
    )
    save_file({"weight": weight.contiguous()}, spec["weights_out"])


def main() -> None:
    with open(sys.argv[1]) as fh:
        spec = json.load(fh)
    torch.set_num_threads(spec["threads"])
    if spec.get("mode") == "matrix":
        matrix(spec)
        return
    from llmcompressor import oneshot
    from safetensors.torch import load_file, save_file
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).eval()
    windows = load_file(spec["windows"])["input_ids"]
    samples = [{"input_ids": w} for w in windows]
    loader = DataLoader(samples, batch_size=spec["batch_size"], shuffle=False)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    oneshot(
        model=model, processor=_tokenizer(), dataset=loader, recipe=_recipe(spec),
        num_calibration_samples=len(samples), pipeline="sequential", output_dir=None,
    )
    wall = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    weights = {
        name: mod.weight.detach().contiguous()
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}"
    }
    save_file(weights, spec["weights_out"])
    with open(spec["result_out"], "w") as fh:
        json.dump({
            "wall_s": wall,
            "cpu_s": cpu,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_mb": rss_before,
            "threads": torch.get_num_threads(),
        }, fh)


if __name__ == "__main__":
    main()
