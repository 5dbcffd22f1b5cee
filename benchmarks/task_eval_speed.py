"""Downstream-task scoring speed: lm-eval's HFLM (batch 1 and 8) against our FastMCLM on the
same SIB-200, XNLI and Belebele requests, in documents/s, with the largest per-request
log-likelihood difference. Prints a table; asserts nothing.

    .venv/bin/python benchmarks/task_eval_speed.py --docs 40       # embedded Gemma 3 270M

The requests of the first ``--docs`` documents of each suite in ``--lang`` are built once by
lm-eval (our task YAMLs, zero-shot) and every scorer's ``loglikelihood`` is timed on exactly
those ``Instance`` objects (tokenisation included; lm-eval's fixed per-run costs, e.g. its
environment report and task loading, are not: they are the same for every scorer). The last
line reads ``speed-up vs best HFLM: <x>x, max |dloglik| <d>``.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import defaultdict

import torch
from _common import load_avg, machine_line
from lm_eval.tasks import TaskManager

from pipeline.config import ModelCfg
from pipeline.evaluate.lm_eval_runner import TASKS_DIR, make_lm, task_name
from pipeline.loading import load_model

SUITES = ("sib200", "xnli", "belebele")
SCORERS = (("HFLM, batch 1", "hflm", 1), ("HFLM, batch 8", "hflm", 8), ("FastMCLM", "fast", 8))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=ModelCfg().model, help="model (default: the embedded one)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--lang", default="en")
    p.add_argument("--docs", type=int, default=40, help="documents per suite")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    return p.parse_args()


def build_requests(lang: str, docs: int) -> dict[str, tuple[list, list[int]]]:
    """Suite -> (loglikelihood Instances of its first ``docs`` documents, gold per document)."""
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    tasks = manager.load([task_name(s, lang) for s in SUITES])["tasks"]
    out = {}
    for suite in SUITES:
        task = tasks[task_name(suite, lang)]
        task.set_config(key="num_fewshot", value=0)
        task.build_all_requests(limit=docs, rank=0, world_size=1)
        n = 1 + max(inst.doc_id for inst in task.instances)
        gold = [task.doc_to_target(task.eval_docs[i]) for i in range(n)]
        out[suite] = (task.instances, gold)
    return out


def accuracy(instances: list, gold: list[int], answers: list[tuple[float, bool]]) -> float:
    """Share of documents whose highest-likelihood choice (first on ties) is the gold one."""
    lls: dict[int, dict[int, float]] = defaultdict(dict)
    for inst, (ll, _) in zip(instances, answers, strict=True):
        lls[inst.doc_id][inst.idx] = ll
    right = [max(c, key=lambda i: (c[i], -i)) == gold[d] for d, c in lls.items()]
    return sum(right) / len(right)


def timed(lm, instances: list) -> tuple[float, float, list[tuple[float, bool]]]:
    """(wall seconds, CPU seconds of this process, answers) of one loglikelihood call."""
    t0, c0 = time.perf_counter(), time.process_time()
    answers = lm.loglikelihood(instances, disable_tqdm=True)
    return time.perf_counter() - t0, time.process_time() - c0, answers


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.ERROR)
    print(machine_line())
    loaded = load_model(ModelCfg(model=args.model, device=args.device))
    model, tok = loaded.model, loaded.tokenizer
    requests = build_requests(args.lang, args.docs)
    n_req = {s: len(requests[s][0]) for s in SUITES}
    print(f"model: {loaded.source} ({loaded.dtype}, {loaded.device}); {args.docs} documents "
          f"per suite in {args.lang} ({', '.join(f'{s} {n} requests' for s, n in n_req.items())})")
    lms = {label: make_lm(model, tok, scorer=scorer, batch_size=bs, device=args.device)
           for label, scorer, bs in SCORERS}
    for lm in lms.values():  # warm-up: first-call costs, and the fast scorer's one-off probe
        lm.loglikelihood(requests["sib200"][0][:7], disable_tqdm=True)
    # Suite by suite, the scorers back to back: a change in the machine's load hits all three.
    wall: dict = defaultdict(dict)
    cpu: dict = defaultdict(dict)
    answers: dict = defaultdict(dict)
    for suite in SUITES:
        for label, lm in lms.items():
            wall[label][suite], cpu[label][suite], answers[label][suite] = timed(
                lm, requests[suite][0])
        print(f"{suite} done; load average {load_avg()}")
    accs = {label: [accuracy(*requests[s], answers[label][s]) for s in SUITES] for label in lms}
    head = (f"\n{'scorer':<14} " + " ".join(f"{s + ' doc/s':>14}" for s in SUITES)
            + f" {'all doc/s':>10} {'seconds':>8} {'CPU s':>8} {'acc':>6}")
    print(head + "\n" + "-" * (len(head) - 1))
    rate = {}
    for label in lms:
        total = sum(wall[label].values())
        rate[label] = len(SUITES) * args.docs / total
        per = " ".join(f"{args.docs / wall[label][s]:14.2f}" for s in SUITES)
        mean_acc = sum(accs[label]) / len(SUITES)
        print(f"{label:<14} {per} {rate[label]:10.2f} {total:8.1f} "
              f"{sum(cpu[label].values()):8.1f} {mean_acc:6.3f}")
    report(rate, answers, accs, wall)


def report(rate: dict, answers: dict, accs: dict, wall: dict) -> None:
    """Per-suite speed-ups, log-likelihood differences, is_greedy / accuracy, the final line."""
    fast = answers["FastMCLM"]
    others = [label for label, _, _ in SCORERS if label != "FastMCLM"]
    print()
    print("FastMCLM vs the faster HFLM per suite: " + ", ".join(
        f"{s} {min(wall[o][s] for o in others) / wall['FastMCLM'][s]:.2f}x" for s in SUITES))
    worst = 0.0
    for label in others:
        pairs = [(a, b) for s in SUITES for a, b in zip(answers[label][s], fast[s], strict=True)]
        d = max(abs(a[0] - b[0]) for a, b in pairs)
        greedy = sum(a[1] != b[1] for a, b in pairs)
        worst = max(worst, d)
        print(f"{label} vs FastMCLM: max |dloglik| {d:.2e} nats over {len(pairs)} requests, "
              f"{greedy} is_greedy differ; accuracy per suite {accs[label]} vs {accs['FastMCLM']}; "
              f"FastMCLM {rate['FastMCLM'] / rate[label]:.2f}x the documents/s")
    best = max(others, key=rate.get)
    print(f"speed-up vs best HFLM: {rate['FastMCLM'] / rate[best]:.2f}x, max |dloglik| {worst:.2e}")


if __name__ == "__main__":
    main()
