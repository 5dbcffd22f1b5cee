"""Checkable sentences of the report's analysis sections, from the runs' interval metrics.

Every number is a run's headline with its bootstrap interval (:mod:`analysis.uncertainty`,
metrics ``<name>.ci95_low/high``). Runs of one (method, calibration language) differing only
in calibration set are averaged: value and both bounds (the bounds' mean is a summary, not a
new interval). A comparison whose intervals overlap is *indistinguishable* and is counted
apart. Differences of means (own vs other calibration language) get a normal-approximation
interval from the runs' half-widths, the runs taken as independent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.uncertainty import BANDS

Z95 = 1.959964
Triple = tuple[float, float, float]


def _fmt(t: Triple, spec: str = ".3f") -> str:
    v, lo, hi = t
    if math.isnan(v):
        return "n/a"
    return f"{v:{spec}} [{lo:{spec}}, {hi:{spec}}]"


def _triple(rows: pd.DataFrame, name: str) -> Triple:
    """Mean value and mean bounds of ``name`` over ``rows`` (NaN when a column is missing)."""
    cols = [name, f"{name}.ci95_low", f"{name}.ci95_high"]
    if rows.empty or any(c not in rows for c in cols):
        return math.nan, math.nan, math.nan
    v, lo, hi = (float(rows[c].mean()) for c in cols)
    return v, lo, hi


def _by_calib(runs: pd.DataFrame, method: str, name: str) -> dict[str, Triple]:
    rows = runs[runs["method"] == method]
    return {c: _triple(g, name) for c, g in rows.groupby("calib_lang", sort=True)}


def own_is_highest(own: Triple, others: Sequence[Triple]) -> str:
    """``yes`` / ``no`` / ``indistinguishable``: is ``own`` above every other, and do the
    intervals of ``own`` and the best other separate?"""
    best = max(others, key=lambda t: t[0])
    if own[1] > best[2]:
        return "yes"
    if best[1] > own[2]:
        return "no"
    return "indistinguishable"


def snr_sentences(runs: pd.DataFrame, method: str, langs: Sequence[str]) -> list[str]:
    """Per layer band: in how many cases the evaluation language's own calibration gives the
    highest accumulated SNR for it."""
    items = []
    for band in BANDS:
        verdicts: dict[str, list[str]] = {"yes": [], "no": [], "indistinguishable": []}
        for lang in langs:
            by = _by_calib(runs, method, f"snr_acc.band.{band}.{lang}")
            others = [t for c, t in by.items() if c != lang and not math.isnan(t[0])]
            if lang not in by or math.isnan(by[lang][0]) or not others:
                continue
            verdicts[own_is_highest(by[lang], others)].append(
                f"{lang} {_fmt(by[lang], '.2f')} dB")
        n = sum(len(v) for v in verdicts.values())
        if n:
            items.append(
                f"{method}, {band} layers: accumulated SNR for evaluation language L is highest "
                f"when calibrated on L in {len(verdicts['yes'])} of {n} cases "
                f"({'; '.join(verdicts['yes']) or 'none'}), lower in {len(verdicts['no'])}, "
                f"indistinguishable in {len(verdicts['indistinguishable'])}")
    return items


def _diff(own: Sequence[Triple], other: Sequence[Triple]) -> Triple:
    """Mean(own) - mean(other), with a normal interval from the items' half-widths."""
    def mean_se(ts: Sequence[Triple]) -> tuple[float, float]:
        se = [(hi - lo) / (2 * Z95) for _, lo, hi in ts]
        return float(np.mean([t[0] for t in ts])), math.sqrt(sum(s * s for s in se)) / len(ts)

    if not own or not other:
        return math.nan, math.nan, math.nan
    (mo, so), (mt, st) = mean_se(own), mean_se(other)
    half = Z95 * math.hypot(so, st)
    return mo - mt, mo - mt - half, mo - mt + half


def own_vs_other(runs: pd.DataFrame, method: str, langs: Sequence[str], name: str) -> Triple:
    """Own-language minus other-language calibration of metric ``<name>.<lang>``."""
    own: list[Triple] = []
    other: list[Triple] = []
    for lang in langs:
        for calib, t in _by_calib(runs, method, f"{name}.{lang}").items():
            if not math.isnan(t[0]):
                (own if calib == lang else other).append(t)
    return _diff(own, other)


def _verdict(t: Triple) -> str:
    if math.isnan(t[0]):
        return "n/a"
    return "yes" if t[1] > 0 else "no" if t[2] < 0 else "indistinguishable"


def lsar_sentences(runs: pd.DataFrame, method: str, langs: Sequence[str]) -> list[str]:
    """Relative agnostic vs specific change per band, the mid-late concentration verdicts and
    own-vs-other differences, each with its interval."""
    rows = runs[runs["method"] == method]
    if "lsar.rel.agnostic" not in rows:
        return []
    bands = "; ".join(
        f"{b} {_fmt(_triple(rows, f'lsar.rel.agnostic.band.{b}'), '.4f')} vs "
        f"{_fmt(_triple(rows, f'lsar.rel.specific.band.{b}'), '.4f')}" for b in BANDS)
    name = "lsar.rel.agnostic.midlate_minus_early"
    verdicts = [_verdict(_triple(rows.iloc[[i]], name)) for i in range(len(rows))]
    counts = {v: verdicts.count(v) for v in ("yes", "no", "indistinguishable")}
    own_a = own_vs_other(runs, method, langs, "lsar.rel.agnostic")
    own_s = own_vs_other(runs, method, langs, "lsar.rel.specific")
    return [
        f"{method}: change of the agnostic vs the specific part, as a share of the dense feature "
        f"norm (mean over runs, 95% intervals), by layer third: {bands}",
        f"{method}: agnostic loss concentrated in middle-to-late layers: yes in {counts['yes']}, "
        f"no in {counts['no']}, indistinguishable in {counts['indistinguishable']} of "
        f"{len(verdicts)} runs",
        f"{method}: own-language minus other-language calibration, agnostic share "
        f"{_fmt(own_a, '.4f')} (above 0: {_verdict(own_a)}), specific share "
        f"{_fmt(own_s, '.4f')} (above 0: {_verdict(own_s)})",
    ]


def lape_sentences(runs: pd.DataFrame, method: str, langs: Sequence[str]) -> list[str]:
    """Own-vs-other removed share of a language's specific neurons, and the mean Jaccard, with
    intervals."""
    rows = runs[runs["method"] == method]
    if not any(f"lape.removed.{lang}.ci95_low" in rows for lang in langs):
        return []
    own = own_vs_other(runs, method, langs, "lape.removed")
    jac = [_triple(rows, f"lape.overlap.{lang}") for lang in langs]
    jac = [t for t in jac if not math.isnan(t[0])]
    mean_jac: Triple = (math.nan, math.nan, math.nan)
    if jac:
        v, lo, hi = (float(np.mean([t[k] for t in jac])) for k in range(3))
        mean_jac = (v, lo, hi)
    return [f"{method}: removed share of a language's specific neurons, own-language minus "
            f"other-language calibration {_fmt(own, '.4f')} (above 0: {_verdict(own)}); "
            f"dense vs pruned Jaccard {_fmt(mean_jac, '.3f')} (mean over languages and runs)"]
