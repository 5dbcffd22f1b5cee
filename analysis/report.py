"""The paper-style report built from tables: matrices, figures, CSVs and the summary.

Pure functions over DataFrames and arrays (no tracking store: :mod:`jobs.report` reads
the store and calls :func:`build_report`). Everything is deterministic: rows and columns are
sorted, CSV floats use one fixed format, figures come from :mod:`analysis.plots` (fixed
style, no metadata), and the summary states numbers with fixed precision. The same inputs
therefore give byte-identical files.

Conventions: ``runs`` has one row per pruned run with columns ``run_id``, ``method``,
``calib_lang``, ``calib_set`` and one column per metric (``ppl.de``, ``sib200.de``, ...).
A calibration x evaluation matrix averages a calibration language's runs over its
calibration sets.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import plots
from analysis.iou import random_iou_baseline
from analysis.snr import snr_from_sums

FLOAT_FORMAT = "%.6g"
RUN_KEYS = ["run_id", "method", "calib_lang", "calib_set"]


@dataclass
class ReportInputs:
    """Everything the report shows, already read from the store.

    Attributes:
        sweep_run: The sweep parent run id.
        runs: One row per pruned run (see the module docstring).
        dense: The dense baseline's metrics (``ppl.de`` -> value); empty if unknown.
        eval_langs: Evaluation languages in config order.
        tasks: Task suites (metrics ``<task>.<lang>``).
        sparsity: Method -> target sparsity (for the random IoU baseline).
        iou: Method -> language x language IoU matrix (intra on the diagonal).
        iou_summary: Per method ``intra``, ``inter``, ``n_intra``, ``n_inter``.
        snr: Rows of every run's SNR table plus :data:`RUN_KEYS`.
        lsar: Rows of every run's LSAR table plus :data:`RUN_KEYS`.
        lape: Rows of every run's LAPE table plus :data:`RUN_KEYS`.
        lape_scores: ``"dense"`` or a run id -> LAPE score of every FFN neuron.
    """

    sweep_run: str
    runs: pd.DataFrame
    dense: Mapping[str, float] = field(default_factory=dict)
    eval_langs: Sequence[str] = ()
    tasks: Sequence[str] = ()
    sparsity: Mapping[str, float] = field(default_factory=dict)
    iou: Mapping[str, pd.DataFrame] = field(default_factory=dict)
    iou_summary: pd.DataFrame | None = None
    snr: pd.DataFrame | None = None
    lsar: pd.DataFrame | None = None
    lape: pd.DataFrame | None = None
    lape_scores: Mapping[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class Finding:
    """Whether target-language calibration is best for one evaluation language.

    Attributes:
        eval_lang: The evaluation (= target) language.
        target: The target-calibrated value.
        best_lang: The best calibration language (the target itself when it ties).
        best: The best value.
        target_best: True when the target's value is the best (ties included).
        tied: True when the target is best but another calibration language equals it.
        other_lang: The best calibration language other than the target ("" if none).
        other: Its value (NaN if none).
    """

    eval_lang: str
    target: float
    best_lang: str
    best: float
    target_best: bool
    tied: bool = False
    other_lang: str = ""
    other: float = math.nan


# ---- tables ----------------------------------------------------------------------------------


def write_csv(frame: pd.DataFrame, path: Path, index: bool = False) -> Path:
    """CSV with a fixed float format and ``\\n`` line ends (byte-stable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=index, float_format=FLOAT_FORMAT, lineterminator="\n")
    return path


def methods(runs: pd.DataFrame) -> list[str]:
    """The pruning methods of the runs, sorted."""
    return sorted(set(runs["method"]))


def metric_matrix(
    runs: pd.DataFrame, method: str, prefix: str, langs: Sequence[str]
) -> pd.DataFrame:
    """Calibration x evaluation matrix of metric ``<prefix>.<lang>`` for one method.

    Rows are calibration languages (sorted), columns ``langs``; a cell is the mean over the
    calibration sets of that language (NaN where no run logged the metric).
    """
    rows = runs[runs["method"] == method]
    cols = [f"{prefix}.{lang}" for lang in langs]
    frame = pd.DataFrame(index=sorted(set(rows["calib_lang"])), columns=list(langs), dtype=float)
    for calib, group in rows.groupby("calib_lang", sort=True):
        for lang, col in zip(langs, cols):
            values = pd.to_numeric(group[col], errors="coerce") if col in group else pd.Series()
            frame.loc[calib, lang] = float(values.mean()) if values.notna().any() else math.nan
    frame.index.name, frame.columns.name = "calibration language", "evaluation language"
    return frame


def dense_reference(
    dense: Mapping[str, float], prefix: str, langs: Sequence[str]
) -> dict[str, float]:
    """The dense baseline's ``<prefix>.<lang>`` values (languages it logged)."""
    return {lang: float(dense[f"{prefix}.{lang}"]) for lang in langs if f"{prefix}.{lang}" in dense}


def has_metric(runs: pd.DataFrame, prefix: str, langs: Sequence[str]) -> bool:
    """True if some run logged ``<prefix>.<lang>`` for one of ``langs``."""
    cols = [f"{prefix}.{lang}" for lang in langs if f"{prefix}.{lang}" in runs]
    return any(pd.to_numeric(runs[c], errors="coerce").notna().any() for c in cols)


def target_findings(matrix: pd.DataFrame, better: str) -> list[Finding]:
    """For each evaluation language with a same-language calibration row: is it the best?"""
    out = []
    for lang in matrix.columns:
        if lang not in matrix.index or math.isnan(matrix.loc[lang, lang]):
            continue
        column = matrix[lang].dropna()
        best_value = column.min() if better == "min" else column.max()
        target = float(matrix.loc[lang, lang])
        target_best = target == best_value
        best_lang = lang if target_best else str(column.idxmin() if better == "min"
                                                  else column.idxmax())
        tied = target_best and int((column == best_value).sum()) > 1
        others = column.drop(lang)
        other_lang = "" if others.empty else str(
            others.idxmin() if better == "min" else others.idxmax())
        other = float(others[other_lang]) if other_lang else math.nan
        out.append(Finding(str(lang), target, best_lang, float(best_value), target_best, tied,
                           other_lang, other))
    return out


def _with_keys(frame: pd.DataFrame | None, sort: Sequence[str]) -> pd.DataFrame | None:
    if frame is None or frame.empty:
        return None
    return frame.sort_values(list(sort), kind="stable").reset_index(drop=True)


# ---- figures ---------------------------------------------------------------------------------


def _matrix_files(folder: Path, name: str, matrix: pd.DataFrame, title: str, better: str,
                  reference: Mapping[str, float] | None, fmt: str) -> list[Path]:
    csv = matrix.copy()
    if reference:
        csv.loc["dense"] = [reference.get(c, math.nan) for c in csv.columns]
    return [
        write_csv(csv, folder / f"{name}.csv", index=True),
        plots.matrix_heatmap(matrix, folder / f"{name}.png", title=title, better=better,
                             reference=reference or None, fmt=fmt),
    ]


def ppl_and_task_files(inputs: ReportInputs, folder: Path) -> list[Path]:
    """Per method: the perplexity matrix and one matrix per task (best cell starred)."""
    files: list[Path] = []
    langs = list(inputs.eval_langs)
    for method in methods(inputs.runs):
        ppl = metric_matrix(inputs.runs, method, "ppl", langs)
        files += _matrix_files(folder, f"ppl_{method}", ppl, f"perplexity, {method}\n"
                               "lower is better, * best calibration", "min",
                               dense_reference(inputs.dense, "ppl", langs), ".2f")
        for task in inputs.tasks:
            if not has_metric(inputs.runs, task, langs):
                continue
            matrix = metric_matrix(inputs.runs, method, task, langs).dropna(axis=1, how="all")
            files += _matrix_files(folder, f"{task}_{method}", matrix, f"{task}, {method}\n"
                                   "higher is better, * best calibration", "max",
                                   dense_reference(inputs.dense, task, matrix.columns), ".3f")
    return files


def iou_files(inputs: ReportInputs, folder: Path) -> list[Path]:
    """Per method the language x language IoU matrix (CSV) and heatmap with the baseline."""
    files: list[Path] = []
    for method in sorted(inputs.iou):
        matrix = inputs.iou[method]
        files.append(write_csv(matrix, folder / f"iou_{method}.csv", index=True))
        files.append(plots.iou_heatmap(matrix, folder / f"iou_{method}.png",
                                       sparsity=inputs.sparsity.get(method, 0.5),
                                       title=f"mask IoU, {method} (diagonal: intra-language)"))
    return files


def _bars(frame: pd.DataFrame, method: str, value: str) -> pd.DataFrame:
    """Index = evaluation language, columns = calibration language, mean of ``value``."""
    rows = frame[frame["method"] == method]
    table = rows.groupby(["eval_lang", "calib_lang"], sort=True)[value].mean().unstack()
    table.index.name, table.columns.name = "evaluation language", "calibration language"
    return table


def _layer_series(frame: pd.DataFrame, method: str, value: str) -> dict[str, list[float]]:
    """Calibration language -> mean of ``value`` per layer (over evaluation languages)."""
    rows = frame[frame["method"] == method]
    means = rows.groupby(["calib_lang", "layer"], sort=True)[value].mean()
    return {calib: group.sort_index().tolist()
            for calib, group in means.groupby(level="calib_lang", sort=True)}


def lsar_files(inputs: ReportInputs, folder: Path) -> list[Path]:
    """LSAR change per evaluation language coloured by calibration language, and per layer."""
    lsar = inputs.lsar
    if lsar is None:
        return []
    files = [write_csv(lsar, folder / "lsar.csv")]
    for method in sorted(set(lsar["method"])):
        for part in ("agnostic", "specific"):
            files.append(plots.grouped_bars(
                _bars(lsar, method, part), folder / f"lsar_{part}_{method}.png",
                ylabel=f"mean |change| of the {part} part",
                title=f"LSAR {part} change, {method} (mean over layers)"))
            files.append(plots.layer_lines(
                _layer_series(lsar, method, part), folder / f"lsar_{part}_layers_{method}.png",
                ylabel=f"mean |change| of the {part} part",
                title=f"LSAR {part} change per layer, {method} (mean over eval languages)"))
    return files


def lape_files(inputs: ReportInputs, folder: Path) -> list[Path]:
    """LAPE distributions dense vs pruned, overlap and removed fractions per language."""
    lape = inputs.lape
    if lape is None:
        return []
    files = [write_csv(lape, folder / "lape.csv")]
    for method in sorted(set(lape["method"])):
        rows = inputs.runs[inputs.runs["method"] == method].sort_values(["calib_lang", "calib_set"])
        first = rows.drop_duplicates("calib_lang")  # one calibration set per language
        pruned = {r.calib_lang: inputs.lape_scores[r.run_id] for r in first.itertuples()
                  if r.run_id in inputs.lape_scores}
        if "dense" in inputs.lape_scores and pruned:
            files.append(plots.lape_histograms(
                inputs.lape_scores["dense"], pruned, folder / f"lape_hist_{method}.png",
                title=f"LAPE of FFN neurons: dense vs {method} (by calibration language)"))
        removed = _bars(lape.rename(columns={"lang": "eval_lang"}), method, "removed_fraction")
        files.append(plots.grouped_bars(
            removed, folder / f"lape_removed_{method}.png",
            baseline=inputs.sparsity.get(method), baseline_label="sparsity",
            ylabel="weights of the language's specific neurons pruned",
            title=f"LAPE neurons removed by the mask, {method}"))
    return files


def snr_layer_series(snr: pd.DataFrame, method: str, kind: str) -> dict[str, list[float]]:
    """Calibration language -> SNR per layer, sums pooled over evaluation languages and sets."""
    rows = snr[(snr["method"] == method) & (snr["kind"] == kind)]
    sums = rows.groupby(["calib_lang", "layer"], sort=True)[["signal", "noise"]].sum()
    out: dict[str, list[float]] = {}
    for calib, group in sums.groupby(level="calib_lang", sort=True):
        group = group.sort_index()
        out[str(calib)] = [snr_from_sums(s, n) for s, n in zip(group["signal"], group["noise"])]
    return out


def snr_files(inputs: ReportInputs, folder: Path) -> list[Path]:
    """The SNR table and, per method, local and accumulated SNR per layer by calibration."""
    snr = inputs.snr
    if snr is None:
        return []
    files = [write_csv(snr, folder / "snr.csv")]
    for method in sorted(set(snr["method"])):
        for kind in ("local", "accumulated"):
            files.append(plots.layer_lines(
                snr_layer_series(snr, method, kind), folder / f"snr_{kind}_{method}.png",
                ylabel="SNR (dB)", title=f"{kind} SNR of the pruning error per layer, {method}"))
    return files


# ---- summary ---------------------------------------------------------------------------------

Block = tuple[str, object]  # ("h1"|"h2"|"p", text) | ("ul", [text]) | ("img", (alt, file))


def _fmt(value: float, spec: str) -> str:
    return "n/a" if value is None or math.isnan(value) else format(value, spec)


def finding_sentences(
    findings: Sequence[Finding], what: str, spec: str, better_word: str
) -> tuple[str, list[str]]:
    """A count sentence, and bullets: where another language wins, and by how much the
    target wins elsewhere (against the best other calibration language)."""
    wins = [f.eval_lang for f in findings if f.target_best]
    ties = [f.eval_lang for f in findings if f.tied]
    detail = ", ".join(wins) + (f"; tied: {', '.join(ties)}" if ties else "")
    head = (f"target-language calibration is {better_word} for {len(wins)} of {len(findings)} "
            f"evaluation languages" + (f" ({detail})" if wins else ""))
    others = [
        f"{f.eval_lang}: calibrating on {f.best_lang} gives {what} {_fmt(f.best, spec)} vs "
        f"{_fmt(f.target, spec)} with {f.eval_lang}"
        for f in findings if not f.target_best
    ]
    margins = [
        f"{f.eval_lang}: {what} {_fmt(f.target, spec)} with {f.eval_lang} vs "
        f"{_fmt(f.other, spec)} with {f.other_lang}, the best other calibration language"
        for f in findings if f.target_best and f.other_lang
    ]
    return head, others, margins


def _metric_section(inputs: ReportInputs, prefix: str, title: str, better: str, spec: str,
                    totals: dict[str, list[int]]) -> list[Block]:
    blocks: list[Block] = [("h2", title)]
    word = "best (ties included)"
    for method in methods(inputs.runs):
        matrix = metric_matrix(inputs.runs, method, prefix, list(inputs.eval_langs))
        findings = target_findings(matrix, better)
        head, others, margins = finding_sentences(findings, prefix, spec, word)
        count = totals.setdefault(prefix if prefix == "ppl" else "tasks", [0, 0])
        count[0] += sum(f.target_best for f in findings)
        count[1] += len(findings)
        tail = "; another language wins for:" if others else "."
        blocks.append(("p", f"{method}: {head}{tail}"))
        if others:
            blocks.append(("ul", others))
        if margins:
            blocks += [("p", "Where the target language is best:"), ("ul", margins)]
        image = f"{prefix}_{method}.png"
        blocks.append(("img", (f"{title}, {method}", image)))
    return blocks


def _iou_section(inputs: ReportInputs) -> list[Block]:
    if inputs.iou_summary is None or inputs.iou_summary.empty:
        return [("h2", "Mask overlap (IoU)"), ("p", "No IoU yet: run `analyze`.")]
    items = []
    for row in inputs.iou_summary.sort_values("method").itertuples():
        base = random_iou_baseline(inputs.sparsity.get(row.method, 0.5))
        items.append(f"{row.method}: intra-language IoU {_fmt(row.intra, '.3f')} "
                     f"({row.n_intra} pairs), inter-language {_fmt(row.inter, '.3f')} "
                     f"({row.n_inter} pairs), random masks {base:.3f}")
    blocks: list[Block] = [("h2", "Mask overlap (IoU)"), ("ul", items)]
    blocks += [("img", (f"mask IoU, {m}", f"iou_{m}.png")) for m in sorted(inputs.iou)]
    return blocks


def _own_vs_other(
    frame: pd.DataFrame, method: str, lang_col: str, value: str
) -> tuple[float, float]:
    """Mean ``value`` where calibration language == evaluation/neuron language, and elsewhere."""
    rows = frame[frame["method"] == method]
    own = rows[rows["calib_lang"] == rows[lang_col]][value]
    other = rows[rows["calib_lang"] != rows[lang_col]][value]
    mean = lambda s: float(s.mean()) if s.notna().any() else math.nan  # noqa: E731
    return mean(own), mean(other)


def _analysis_sections(inputs: ReportInputs) -> list[Block]:
    blocks: list[Block] = []
    if inputs.lsar is not None:
        items = []
        for m in sorted(set(inputs.lsar["method"])):
            own_a, other_a = _own_vs_other(inputs.lsar, m, "eval_lang", "agnostic")
            own_s, other_s = _own_vs_other(inputs.lsar, m, "eval_lang", "specific")
            items.append(f"{m}: mean change of the agnostic part {_fmt(own_a, '.4g')} when "
                         f"calibrating on the evaluation language vs {_fmt(other_a, '.4g')} "
                         f"otherwise; specific part {_fmt(own_s, '.4g')} vs {_fmt(other_s, '.4g')}")
        blocks += [("h2", "LSAR: language-agnostic and language-specific subspaces"), ("ul", items)]
        blocks += [("img", (f"LSAR {p}, {m}", f"lsar_{p}_{m}.png"))
                   for m in sorted(set(inputs.lsar["method"])) for p in ("agnostic", "specific")]
    if inputs.lape is not None:
        items = []
        for m in sorted(set(inputs.lape["method"])):
            own, other = _own_vs_other(inputs.lape, m, "lang", "removed_fraction")
            jac = inputs.lape[inputs.lape["method"] == m]["jaccard"]
            items.append(f"{m}: the mask removes {_fmt(own, '.3f')} of the weights of a "
                         f"language's specific neurons when calibrating on that language vs "
                         f"{_fmt(other, '.3f')} for other calibration languages; dense vs pruned "
                         f"neuron sets overlap (Jaccard) {_fmt(float(jac.mean()), '.3f')} "
                         "on average")
        blocks += [("h2", "LAPE: language-specific neurons"), ("ul", items)]
        blocks += [("img", (f"LAPE, {m}", f"lape_hist_{m}.png"))
                   for m in sorted(set(inputs.lape["method"]))
                   if "dense" in inputs.lape_scores]
    if inputs.snr is not None:
        blocks += [("h2", "SNR of the pruning error"), ("ul", _snr_items(inputs))]
        blocks += [("img", (f"SNR, {m}", f"snr_accumulated_{m}.png"))
                   for m in sorted(set(inputs.snr["method"]))]
    return blocks


def _snr_items(inputs: ReportInputs) -> list[str]:
    items = []
    for m in sorted(set(inputs.snr["method"])):
        final = {c: v[-1] for c, v in snr_layer_series(inputs.snr, m, "accumulated").items() if v}
        if not final:
            continue
        lo = min(final, key=lambda c: (final[c], c))
        hi = max(final, key=lambda c: (final[c], c))
        items.append(f"{m}: accumulated SNR after the last layer from {final[lo]:.2f} dB "
                     f"(calibrated on {lo}) to {final[hi]:.2f} dB (on {hi})")
    return items


def summary_blocks(inputs: ReportInputs, title: str) -> list[Block]:
    """The summary as blocks: headline counts first, then one section per analysis."""
    totals: dict[str, list[int]] = {}
    sections = _metric_section(inputs, "ppl", "Perplexity", "min", ".2f", totals)
    for task in inputs.tasks:
        if has_metric(inputs.runs, task, list(inputs.eval_langs)):
            sections += _metric_section(inputs, task, f"Task {task}", "max", ".3f", totals)
    headline = []
    for key, label in (("ppl", "the lowest perplexity"), ("tasks", "the best task score")):
        if key in totals and totals[key][1]:
            won, total = totals[key]
            headline.append(f"Target-language calibration gives {label} in {won} of {total} "
                            f"(method, evaluation language{', task' if key == 'tasks' else ''}) "
                            f"cases ({100 * won / total:.0f}%; ties count as best).")
    return [("h1", title), ("p", f"Sweep run {inputs.sweep_run}."), ("h2", "Headline"),
            ("ul", headline or ["No pruned runs with same-language calibration."]),
            *sections, *_iou_section(inputs), *_analysis_sections(inputs)]


def render_markdown(blocks: Sequence[Block], existing: set[str]) -> str:
    """Markdown of the blocks; images only if their file was written."""
    out = []
    for kind, body in blocks:
        if kind == "h1":
            out.append(f"# {body}\n")
        elif kind == "h2":
            out.append(f"## {body}\n")
        elif kind == "p":
            out.append(f"{body}\n")
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in body) + "\n")  # type: ignore[union-attr]
        elif kind == "img" and body[1] in existing:  # type: ignore[index]
            out.append(f"![{body[0]}]({body[1]})\n")  # type: ignore[index]
    return "\n".join(out)


def render_html(blocks: Sequence[Block], existing: set[str], title: str) -> str:
    """A self-contained HTML page of the blocks (images by relative path), escaped."""
    esc = html.escape
    out = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">",
           f"<title>{esc(title)}</title></head><body>"]
    for kind, body in blocks:
        if kind in ("h1", "h2", "p"):
            out.append(f"<{kind}>{esc(str(body))}</{kind}>")
        elif kind == "ul":
            items = "".join(f"<li>{esc(i)}</li>" for i in body)  # type: ignore[union-attr]
            out.append(f"<ul>{items}</ul>")
        elif kind == "img" and body[1] in existing:  # type: ignore[index]
            alt, src = body  # type: ignore[misc]
            out.append(f"<p><img src=\"{esc(src)}\" alt=\"{esc(alt)}\"></p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ---- everything ------------------------------------------------------------------------------


def normalise(inputs: ReportInputs) -> ReportInputs:
    """Sort every table so that row order never depends on the store's order."""
    runs = inputs.runs.sort_values(["method", "calib_lang", "calib_set", "run_id"],
                                   kind="stable").reset_index(drop=True)
    snr = _with_keys(inputs.snr, ["method", "calib_lang", "calib_set", "run_id", "kind",
                                  "eval_lang", "layer"])
    lsar = _with_keys(inputs.lsar, ["method", "calib_lang", "calib_set", "run_id", "eval_lang",
                                    "layer"])
    lape = _with_keys(inputs.lape, ["method", "calib_lang", "calib_set", "run_id", "lang"])
    return ReportInputs(inputs.sweep_run, runs, dict(inputs.dense), list(inputs.eval_langs),
                        list(inputs.tasks), dict(inputs.sparsity), dict(inputs.iou),
                        inputs.iou_summary, snr, lsar, lape, dict(inputs.lape_scores))


def build_report(inputs: ReportInputs, folder: str | Path, title: str = "") -> list[Path]:
    """Write every matrix, figure, CSV and the summary into ``folder``.

    Args:
        inputs: What to show (see :class:`ReportInputs`).
        folder: Output folder (created).
        title: Summary title; defaults to one naming the sweep.

    Returns:
        The written files, sorted by name.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    inputs = normalise(inputs)
    files = ppl_and_task_files(inputs, out)
    files += iou_files(inputs, out)
    files += lsar_files(inputs, out) + lape_files(inputs, out) + snr_files(inputs, out)
    files.append(write_csv(inputs.runs, out / "runs.csv"))
    title = title or f"langprune report, sweep {inputs.sweep_run}"
    blocks = summary_blocks(inputs, title)
    existing = {p.name for p in files}
    (out / "summary.md").write_text(render_markdown(blocks, existing), encoding="utf-8")
    (out / "summary.html").write_text(render_html(blocks, existing, title), encoding="utf-8")
    files += [out / "summary.md", out / "summary.html"]
    return sorted(files, key=lambda p: p.name)
