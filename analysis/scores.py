"""Scores with their uncertainty, from per-document and per-window records of one run.

Turns the evaluation's records into the metrics every run logs next to its scores
(docs/statistics.md): per ``<task>.<lang>`` the Wilson 95% interval of the accuracy
(``.ci95_low``, ``.ci95_high``), the number of documents (``.n``) and the chance level
(``.chance``, the mean of 1 / number of choices); per ``ppl.<lang>`` a percentile bootstrap
interval over the perplexity windows. Also the console summary table of a run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from analysis.paired import paired_perplexity
from analysis.stats import fmt_interval, is_informative, perplexity_interval, wilson_interval

#: Columns of the per-window perplexity records this module reads.
WINDOW_COLUMNS = ("lang", "window", "nll_sum", "n_tokens", "n_bytes")


def score_key(task: str, lang: str | None) -> str:
    """The metric a task's accuracy is logged under: ``sib200.sw``, or ``arc_easy.acc``."""
    return f"{task}.{lang}" if lang else f"{task}.acc"


def task_interval_metrics(records: pd.DataFrame) -> dict[str, float]:
    """``<key>.ci95_low/.ci95_high/.n/.chance`` for every (task, lang) of the records."""
    out: dict[str, float] = {}
    if records is None or records.empty:
        return out
    langs = records["lang"].fillna("")
    for (task, lang), group in records.groupby([records["task"], langs], sort=True):
        key = score_key(str(task), str(lang) or None)
        k, n = int(group["correct"].sum()), len(group)
        low, high = wilson_interval(k, n)
        out[f"{key}.ci95_low"] = low
        out[f"{key}.ci95_high"] = high
        out[f"{key}.n"] = float(n)
        out[f"{key}.chance"] = float((1.0 / group["n_choices"]).mean())
    return out


def informative_tasks(records: pd.DataFrame) -> dict[str, bool]:
    """Per score key: whether the accuracy's interval excludes the chance level."""
    out: dict[str, bool] = {}
    langs = records["lang"].fillna("")
    for (task, lang), group in records.groupby([records["task"], langs], sort=True):
        chance = float((1.0 / group["n_choices"]).mean())
        out[score_key(str(task), str(lang) or None)] = is_informative(
            int(group["correct"].sum()), len(group), chance)
    return out


def ppl_interval_metrics(windows: pd.DataFrame, seed: int = 0) -> dict[str, float]:
    """``ppl.<lang>.ci95_low/high`` from a bootstrap over each language's windows."""
    out: dict[str, float] = {}
    if windows is None or windows.empty:
        return out
    for lang, group in windows.groupby("lang", sort=True):
        if len(group) < 2:  # one window: no spread to resample
            continue
        ival = perplexity_interval(group["nll_sum"].to_numpy(), group["n_tokens"].to_numpy(),
                                   seed=seed)
        out[f"ppl.{lang}.ci95_low"] = ival.low
        out[f"ppl.{lang}.ci95_high"] = ival.high
    return out


def ppl_ratio_interval_metrics(windows: pd.DataFrame, dense_windows: pd.DataFrame,
                               seed: int = 0) -> dict[str, float]:
    """``ppl_ratio.<lang>.ci95_low/high``: the pruned / dense perplexity ratio's paired
    bootstrap interval over the windows both runs scored (same ``lang`` and ``window``).

    A language whose windows do not pair (different token counts: another tokenizer or
    budget) or that has fewer than two gets no interval.
    """
    out: dict[str, float] = {}
    if windows is None or dense_windows is None or windows.empty or dense_windows.empty:
        return out
    both = windows.merge(dense_windows, on=["lang", "window"], suffixes=("", "_dense"))
    for lang, group in both.groupby("lang", sort=True):
        if len(group) < 2 or not (group["n_tokens"] == group["n_tokens_dense"]).all():
            continue
        ratio = paired_perplexity(group["nll_sum"].to_numpy(), group["nll_sum_dense"].to_numpy(),
                                  group["n_tokens"].to_numpy(), seed=seed).ratio
        out[f"ppl_ratio.{lang}.ci95_low"] = ratio.low
        out[f"ppl_ratio.{lang}.ci95_high"] = ratio.high
    return out


def mean_over_parts_interval(parts: list, kind: str, *, resamples: int = 1000, seed: int = 0,
                             confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean over independent parts (e.g. one per run and
    evaluation language) of each part's score, every part resampled on its own units:
    ``kind="acc"``: a part is its documents' correct flags (score: accuracy);
    ``kind="ppl"``: a part is ``(nll_sum, n_tokens)`` of its windows (score: perplexity).
    For figures that show a mean over languages; comparisons between runs are paired
    elsewhere (:mod:`analysis.paired`)."""
    if not parts:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    for part in parts:
        if kind == "acc":
            x = np.asarray(part, dtype=float)
            total += x[rng.integers(0, len(x), (resamples, len(x)))].mean(axis=1)
        elif kind == "ppl":
            nll, tok = (np.asarray(a, dtype=float) for a in part)
            idx = rng.integers(0, len(nll), (resamples, len(nll)))
            total += np.exp(nll[idx].sum(axis=1) / tok[idx].sum(axis=1))
        else:
            raise ValueError(f"kind must be 'acc' or 'ppl', got {kind!r}")
    tail = (1.0 - confidence) / 2
    boot = total / len(parts)
    return float(np.quantile(boot, tail)), float(np.quantile(boot, 1.0 - tail))


def _cell(metrics: Mapping[str, float], key: str, digits: int) -> str:
    if key not in metrics:
        return "-"
    low, high = metrics.get(f"{key}.ci95_low"), metrics.get(f"{key}.ci95_high")
    if low is None or high is None or math.isnan(low):
        return f"{metrics[key]:.{digits}f}"
    return fmt_interval(metrics[key], low, high, digits)


def summary_table(metrics: Mapping[str, float], langs: list[str], tasks: list[str],
                  dense: Mapping[str, float] | None = None) -> pd.DataFrame:
    """One row per evaluation language: dense and pruned perplexity (with intervals), their
    ratio (with its paired interval where ``ppl_ratio.<lang>.ci95_*`` are logged), and each
    task's accuracy with its interval (``task*``: at chance, uninformative).
    """
    rows = []
    for lang in langs:
        row: dict[str, str] = {"lang": lang}
        if dense is not None:
            row["ppl dense"] = _cell(dense, f"ppl.{lang}", 1)
        row["ppl"] = _cell(metrics, f"ppl.{lang}", 1)
        if f"ppl_ratio.{lang}" in metrics:  # with its paired interval when logged
            row["ratio"] = _cell(metrics, f"ppl_ratio.{lang}", 2)
        elif dense is not None and f"ppl.{lang}" in dense and f"ppl.{lang}" in metrics:
            row["ratio"] = f"{metrics[f'ppl.{lang}'] / dense[f'ppl.{lang}']:.2f}"
        for task in tasks:
            key = f"{task}.{lang}"
            cell = _cell(metrics, key, 2)
            chance, n = metrics.get(f"{key}.chance"), metrics.get(f"{key}.n")
            if chance is not None and n and not is_informative(
                    round(metrics[key] * n), int(n), chance):
                cell += "*"
            row[task] = cell
        rows.append(row)
    return pd.DataFrame(rows)


def render_summary(table: pd.DataFrame) -> str:
    """The table as aligned plain text (the console summary; no colour codes in logs)."""
    if table.empty:
        return ""
    return table.to_string(index=False)
