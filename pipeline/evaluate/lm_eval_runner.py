"""Downstream tasks through lm-evaluation-harness, in process.

This module and ``fast_lm.py`` (its HFLM subclass, imported only from here, lazily) are the
only ones importing lm_eval.

``HFLM`` wraps the in-memory (possibly pruned) model; ``TaskManager(include_path=tasks/)``
adds our task YAMLs for the bundled data. Task names:

- the bundled suites ``sib200``, ``xnli`` and ``belebele`` expand to our per-language tasks
  ``langprune_<suite>_<lang>`` for every evaluation language with bundled data (the others
  are reported as skipped); their score is ``acc`` under the key ``<suite>.<lang>``;
- any other name goes to lm-eval as is (e.g. ``xnli_de``, ``arc_easy``: it works when its
  data is reachable); every numeric metric is reported as ``<task>.<metric>``.

Names are checked by :func:`validate_tasks` before any heavy work. Every run is offline
for the bundled tasks: their loaders read ``data/`` (see ``tasks/utils.py``).

Scoring: ``scorer="fast"`` (default) wraps the model in
:class:`pipeline.evaluate.fast_lm.FastMCLM` (an HFLM that computes shared prompt prefixes
once and the output layer only where scored; same numbers); ``scorer="hflm"`` uses plain
HFLM. Per-document outcomes come back as :attr:`TaskResults.records`
(:mod:`pipeline.evaluate.doc_records`).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from pipeline.errors import LangpruneError
from pipeline.paths import data_dir
from pipeline.registry import suggest

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
TASK_PREFIX = "langprune_"
PRIMARY_METRIC = "acc"
# Bundled suite -> folder of its data under data/.
BUNDLED: MappingProxyType[str, str] = MappingProxyType(
    {"sib200": "sib200", "xnli": "xnli_dev", "belebele": "belebele"}
)
_TASK_VERSION = "1.0"
SCORERS = ("fast", "hflm")


@dataclass(frozen=True)
class TaskPlan:
    """What :func:`run_tasks` will ask lm-eval for.

    Attributes:
        names: lm-eval task names, in order.
        keys: Our bundled task names -> ``<suite>.<lang>`` score keys.
        skipped: ``<suite>.<lang>`` pairs without bundled data.
        needs_defaults: True when a name is not ours, so lm-eval's own index is needed.
    """

    names: list[str]
    keys: dict[str, str]
    skipped: list[str]
    needs_defaults: bool


@dataclass
class TaskResults:
    """Task scores and the full lm-eval results (JSON-serialisable)."""

    scores: dict[str, float]
    results_json: dict[str, Any]
    skipped: list[str] = field(default_factory=list)
    # pandas DataFrame of per-document outcomes (doc_records.COLUMNS); None when not asked.
    records: Any = None


def task_name(suite: str, lang: str) -> str:
    """Our lm-eval task name for a bundled suite and language, e.g. ``langprune_xnli_de``."""
    return f"{TASK_PREFIX}{suite}_{lang}"


def bundled_languages(suite: str) -> list[str]:
    """Languages with both a task YAML and a bundled data file for ``suite``."""
    yamls = {p.stem.removeprefix(f"{TASK_PREFIX}{suite}_")
             for p in TASKS_DIR.glob(f"{TASK_PREFIX}{suite}_*.yaml")}
    data = {p.name.removesuffix(".jsonl.gz")
            for p in (Path(data_dir()) / BUNDLED[suite]).glob("*.jsonl.gz")}
    return sorted(yamls & data)


def validate_tasks(tasks: list[str], langs: list[str]) -> TaskPlan:
    """Expand and check task names; cheap unless a name is not one of ours.

    Raises:
        LangpruneError: for an unknown name, listing the bundled suites and close names.
    """
    names: list[str] = []
    keys: dict[str, str] = {}
    skipped: list[str] = []
    others: list[str] = []
    for task in tasks:
        if task in BUNDLED:
            have = set(bundled_languages(task))
            for lang in langs:
                if lang in have:
                    names.append(task_name(task, lang))
                    keys[task_name(task, lang)] = f"{task}.{lang}"
                else:
                    skipped.append(f"{task}.{lang}")
        elif (TASKS_DIR / f"{task}.yaml").is_file():
            names.append(task)
        else:
            others.append(task)
    if others:
        known = set(_lm_eval_task_names())
        for task in others:
            if task not in known:
                raise LangpruneError(
                    f"unknown task {task!r}; bundled: {', '.join(BUNDLED)} (any lm-eval task "
                    f"name also works){suggest(task, sorted(known | set(BUNDLED)))}"
                )
        _check_hub_for(others)
        names.extend(others)
    if skipped:
        log.info("tasks without bundled data, skipped: %s", ", ".join(skipped))
    return TaskPlan(names, keys, skipped, needs_defaults=bool(others))


def _check_hub_for(tasks: list[str]) -> None:
    """Fail fast when lm-eval's own tasks would wait on an unreachable hub.

    With ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` set, ``datasets`` reads its local cache
    and answers at once, so only the unreachable-but-not-offline case is refused here.
    """
    from pipeline.hub import env_flag, hub_offline_flag, hub_online

    if hub_offline_flag() or env_flag("HF_DATASETS_OFFLINE") or hub_online():
        return
    raise LangpruneError(
        f"tasks {', '.join(tasks)} need their data from the Hugging Face hub, which is "
        f"unreachable; set HF_HUB_OFFLINE=1 to use the local datasets cache, or use the "
        f"bundled suites ({', '.join(BUNDLED)}), which run offline"
    )


def _task_manager(include_defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    # Indexing lm-eval's ~15k task configs takes seconds: only when a name needs it.
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults)


@functools.lru_cache(maxsize=1)
def _lm_eval_task_names() -> tuple[str, ...]:
    """Every task and group name lm-eval knows (indexed once per process)."""
    return tuple(_task_manager(include_defaults=True).all_tasks)


def make_lm(model: Any, tokenizer: Any, *, scorer: str = "fast", batch_size: int = 1,
            device: torch.device | str | None = None, max_length: int | None = None) -> Any:
    """The lm-eval model wrapper for ``scorer``: ``"fast"`` (FastMCLM) or ``"hflm"`` (HFLM).

    Raises:
        LangpruneError: for an unknown scorer name.
    """
    if scorer not in SCORERS:
        raise LangpruneError(f"unknown scorer {scorer!r}; known: {', '.join(SCORERS)}"
                             f"{suggest(scorer, list(SCORERS))}")
    lm_class: Any
    if scorer == "fast":
        from pipeline.evaluate.fast_lm import FastMCLM

        lm_class = FastMCLM
    else:
        from lm_eval.models.huggingface import HFLM

        lm_class = HFLM
    return lm_class(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                    device=str(device) if device is not None else None, max_length=max_length)


def run_tasks(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    langs: list[str],
    *,
    limit: int | None = None,
    num_fewshot: int = 0,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    max_length: int | None = None,
    seed: int = 0,
    scorer: str = "fast",
    records: bool = False,
) -> TaskResults:
    """Run lm-eval tasks on an in-memory model.

    Args:
        model: A Hugging Face causal LM (pruned or dense), already on its device.
        tokenizer: Its tokenizer.
        tasks: Bundled suite names and/or lm-eval task names.
        langs: Evaluation languages (for the bundled suites).
        limit: Documents per task (the first ``limit``); None = all. A limit above a
            task's document count uses all of them (one warning names those tasks).
        num_fewshot: Few-shot examples per prompt.
        batch_size: Requests per forward pass (HFLM); groups of requests sharing a prompt
            per forward pass (fast scorer).
        device: The model's device (lm-eval reads it from the model; logged only).
        max_length: Longest input in tokens; None = from the model config.
        seed: lm-eval's random, numpy, torch and few-shot seeds.
        scorer: ``"fast"`` (shared-prefix scoring, the default) or ``"hflm"`` (plain HFLM);
            both give the same log-likelihoods up to float rounding.
        records: Also return per-document records (multiple-choice tasks); every such task
            must then have a per-document id (checked before any forward pass; lm-eval's
            upstream ``xnli_<lang>`` has none, our bundled suites all have one).

    Returns:
        Flat scores, the full results JSON (without the logged samples), the skipped task x
        language pairs and, with ``records``, the per-document DataFrame.

    Raises:
        LangpruneError: unknown task or scorer; with ``records``, a multiple-choice task
            whose documents carry no id.
    """
    import lm_eval

    plan = validate_tasks(tasks, langs)
    lm = make_lm(model, tokenizer, scorer=scorer, batch_size=batch_size, device=device,
                 max_length=max_length) if plan.names else None
    if lm is None:
        return TaskResults({}, {}, plan.skipped, _empty_records() if records else None)
    manager = _task_manager(include_defaults=plan.needs_defaults)
    log.info("lm-eval: %d tasks, limit %s, %d-shot, %s scorer", len(plan.names), limit,
             num_fewshot, scorer)
    with _quiet_custom_dataset_notice(), _task_data_errors(plan.names):
        if records:
            _check_doc_ids(manager, plan.names)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=plan.names,
            num_fewshot=num_fewshot,
            limit=limit,
            bootstrap_iters=0,
            log_samples=records,
            task_manager=manager,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    results = results or {}
    samples = results.pop("samples", None) or {}
    results_json = _json_clean(results)
    _warn_limit_above_docs(results_json, limit)
    frame = None
    if records:
        from pipeline.evaluate.doc_records import records_frame

        types = {n: c.get("output_type", "") for n, c in results_json.get("configs", {}).items()}
        frame = records_frame(samples, plan.keys, types)
    return TaskResults(flatten_scores(results_json, plan.keys), results_json, plan.skipped, frame)


def _empty_records() -> Any:
    import pandas as pd

    from pipeline.evaluate.doc_records import COLUMNS

    return pd.DataFrame(columns=list(COLUMNS))


def _check_doc_ids(manager: Any, names: list[str]) -> None:
    """Refuse, before any forward pass, a multiple-choice task whose documents have no id."""
    from pipeline.evaluate.doc_records import doc_uid

    for name, task in manager.load(names)["tasks"].items():
        if task.OUTPUT_TYPE != "multiple_choice":
            continue
        docs = task.eval_docs
        if len(docs):
            doc_uid(name, docs[0])


def _warn_limit_above_docs(results_json: dict[str, Any], limit: float | None) -> None:
    """One warning line naming every task with fewer documents than ``limit``."""
    if limit is None or limit < 1:  # lm-eval reads a limit below 1 as a fraction
        return
    short = {name: n["original"] for name, n in results_json.get("n-samples", {}).items()
             if n.get("original", limit) < limit}
    if short:
        log.warning("limit %s is above the documents of %s: all of them used", limit,
                    ", ".join(f"{name} ({n})" for name, n in sorted(short.items())))


def flatten_scores(results_json: dict[str, Any], keys: dict[str, str]) -> dict[str, float]:
    """``<suite>.<lang>`` -> acc for our tasks; ``<task>.<metric>`` for the others."""
    scores: dict[str, float] = {}
    for task, metrics in results_json.get("results", {}).items():
        for name, value in metrics.items():
            metric = name.split(",")[0]  # "acc,none" -> "acc" (lm-eval's filter suffix)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if metric.endswith("_stderr"):
                continue
            if task in keys:
                if metric == PRIMARY_METRIC:
                    scores[keys[task]] = float(value)
            else:
                scores[f"{task}.{metric}"] = float(value)
    return scores


class _DropNotice(logging.Filter):
    """Drops lm-eval's per-task hint about ``--metadata`` (shown for every custom_dataset)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


@contextmanager
def _quiet_custom_dataset_notice() -> Iterator[None]:
    logger = logging.getLogger("lm_eval.api.task")
    notice = _DropNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


@contextmanager
def _task_data_errors(names: list[str]) -> Iterator[None]:
    """Turn ``datasets``' "couldn't reach the hub" into one clear line."""
    try:
        yield
    except ConnectionError as e:
        raise LangpruneError(
            f"cannot fetch task data for {', '.join(names)}: {str(e).splitlines()[0]}; the "
            f"bundled suites ({', '.join(BUNDLED)}) run offline"
        ) from None


def _json_clean(obj: Any) -> dict[str, Any]:
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(obj, default=handle_non_serializable))


def language_task_yaml(suite: str, lang: str) -> str:
    """The text of our per-language task file (written by :func:`write_task_files`)."""
    return (
        "# Generated by pipeline.evaluate.lm_eval_runner.write_task_files; do not edit.\n"
        f"include: _{suite}_template_yaml\n"
        f"task: {task_name(suite, lang)}\n"
        "dataset_kwargs:\n"
        f"  lang: {lang}\n"
        "metadata:\n"
        f"  version: {_TASK_VERSION}\n"
    )


def write_task_files(directory: Path = TASKS_DIR) -> list[Path]:
    """(Re)write one task file per bundled suite and language with data; returns them.

    A contract test checks the checked-in files equal this output, so they cannot drift.
    """
    written = []
    for suite, folder in BUNDLED.items():
        for data in sorted((Path(data_dir()) / folder).glob("*.jsonl.gz")):
            lang = data.name.removesuffix(".jsonl.gz")
            path = directory / f"{task_name(suite, lang)}.yaml"
            path.write_text(language_task_yaml(suite, lang), encoding="utf-8")
            written.append(path)
    return written
