"""The report's summary: findings as sentences, sections as blocks, Markdown and HTML.

Numbers are stated with fixed precision and sections come in a fixed order, so the same
inputs give the same text.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import pandas as pd

from analysis import report_analysis as RA
from analysis.comparisons import Case, Column, cases, verdicts
from analysis.iou import random_iou_baseline
from analysis.report_compare import Compared
from analysis.report_tables import (
    Finding,
    ReportInputs,
    analysis_groups,
    groups,
    has_metric,
    metric_matrix,
    snr_layer_series,
    target_findings,
)
from analysis.stats import UNINFORMATIVE, Interval, fmt_interval, headline

Block = tuple[str, object]  # ("h1"|"h2"|"p", text) | ("ul", [text]) | ("img", (alt, file))


def _fmt(value: float, spec: str) -> str:
    return "n/a" if value is None or math.isnan(value) else format(value, spec)


def finding_sentences(
    findings: Sequence[Finding], what: str, spec: str, better_word: str
) -> tuple[str, list[str], list[str]]:
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


def _ival(i: Interval | None, digits: int) -> str:
    return "n/a" if i is None else fmt_interval(i.value, i.low, i.high, digits)


def case_sentence(case: Case, digits: int) -> str:
    """One case: both rows' values with intervals, the paired difference (or ratio) with its
    interval and verdict, the shared units (and any dropped), and the target against dense."""
    what = "ppl" if case.metric == "ppl" else "accuracy"
    unit = "windows" if case.metric == "ppl" else "documents"
    head = f"{case.lang}: "
    if case.verdict == UNINFORMATIVE:
        head += (f"uninformative for this model (dense accuracy {_ival(case.dense, digits)}, "
                 f"chance {case.chance:.{digits}f}); ")
    pair = case.paired
    if pair is None:
        return head + "no other calibration row to compare with"
    c = pair.comparison
    kind = "ratio" if case.metric == "ppl" else "difference"
    diff = fmt_interval(c.estimate, c.low, c.high, 3)
    text = (f"{what} {_ival(pair.a, digits)} with {case.lang} vs {_ival(pair.b, digits)} with "
            f"{case.other_row} (best other row); {kind} {diff} ({c.method}), {c.verdict}; "
            f"{pair.n} {unit}")
    if pair.dropped:
        text += f" ({pair.dropped} {unit} dropped: not evaluated in both rows)"
    if case.vs_dense is not None:
        d = case.vs_dense
        text += f"; vs dense: {kind} {fmt_interval(d.estimate, d.low, d.high, 3)}, {d.verdict}"
    return head + text


def _paired_blocks(label: str, columns: Sequence[Column], digits: int, unit: str,
                   tally: list[str]) -> list[Block]:
    found = cases(columns)
    found_verdicts = verdicts(found)
    tally += found_verdicts
    return [("p", f"{label}, paired on the same {unit}: {headline(found_verdicts)}:"),
            ("ul", [case_sentence(c, digits) for c in found] or ["no target-language row"])]


def _metric_section(inputs: ReportInputs, prefix: str, title: str, better: str, spec: str,
                    totals: dict[str, list[int]], compared: Compared | None = None,
                    paired: dict[str, dict[str, list[str]]] | None = None) -> list[Block]:
    blocks: list[Block] = [("h2", title)]
    word = "best (ties included)"
    kind = prefix if prefix == "ppl" else "tasks"
    unit = "windows" if prefix == "ppl" else "documents"
    for group in groups(inputs.runs):
        matrix = metric_matrix(inputs.runs, group, prefix, list(inputs.eval_langs))
        findings = target_findings(matrix, better)
        head, others, margins = finding_sentences(findings, prefix, spec, word)
        count = totals.setdefault(kind, [0, 0])
        count[0] += sum(f.target_best for f in findings)
        count[1] += len(findings)
        columns = (compared or {}).get((group, prefix))
        tail = "; another language wins for:" if others else "."
        if columns:
            tally = (paired if paired is not None else {}).setdefault(kind, {})
            blocks += _paired_blocks(group.label, columns, int(spec[1]), unit,
                                     tally.setdefault(group.label, []))
            missing = len(findings) - len(cases(columns))
            if missing > 0:
                blocks.append(("p", f"{missing} evaluation language(s) with a target row but "
                                    "no per-document records: not compared."))
            blocks.append(("p", f"{group.label}, by point estimate only: {head}{tail}"))
        else:
            blocks.append(("p", f"{group.label}: no per-document records: no intervals."))
            blocks.append(("p", f"{group.label}: {head}{tail}"))
        if others:
            blocks.append(("ul", others))
        if margins:
            blocks += [("p", "Where the target language is best:"), ("ul", margins)]
        name = group.name
        blocks.append(("img", (f"{title}, {group.label}", f"{prefix}_{name}.png")))
        if prefix != "ppl":
            blocks.append(("img", (f"{title} with intervals, {group.label}",
                                   f"{prefix}_errorbars_{name}.png")))
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
        items, imgs = [], []
        for group, part in analysis_groups(inputs.lsar, inputs.runs):
            m, name = group.method, group.name
            own_a, other_a = _own_vs_other(part, m, "eval_lang", "agnostic")
            own_s, other_s = _own_vs_other(part, m, "eval_lang", "specific")
            items.append(f"{group.label}: mean change of the agnostic part {_fmt(own_a, '.4g')} "
                         f"when calibrating on the evaluation language vs "
                         f"{_fmt(other_a, '.4g')} otherwise; specific part "
                         f"{_fmt(own_s, '.4g')} vs {_fmt(other_s, '.4g')}")
            items += RA.lsar_sentences(group.rows(inputs.runs), m, inputs.eval_langs)
            imgs += [("img", (f"LSAR {p}, {group.label}", f"lsar_{p}_{name}.png"))
                     for p in ("agnostic", "specific")]
        blocks += [("h2", "LSAR: language-agnostic and language-specific subspaces"), ("ul", items)]
        blocks += imgs
    if inputs.lape is not None:
        items, imgs = [], []
        for group, part in analysis_groups(inputs.lape, inputs.runs):
            m, name = group.method, group.name
            own, other = _own_vs_other(part, m, "lang", "removed_fraction")
            jac = part["jaccard"]
            items.append(f"{group.label}: the mask removes {_fmt(own, '.3f')} of the weights of "
                         f"a language's specific neurons when calibrating on that language vs "
                         f"{_fmt(other, '.3f')} for other calibration languages; dense vs pruned "
                         f"neuron sets overlap (Jaccard) {_fmt(float(jac.mean()), '.3f')} "
                         "on average")
            items += RA.lape_sentences(group.rows(inputs.runs), m, inputs.eval_langs)
            if "dense" in inputs.lape_scores:
                imgs.append(("img", (f"LAPE, {group.label}", f"lape_hist_{name}.png")))
        blocks += [("h2", "LAPE: language-specific neurons"), ("ul", items)]
        blocks += imgs
    if inputs.snr is not None:
        blocks += [("h2", "SNR of the pruning error"), ("ul", _snr_items(inputs))]
        blocks += [("img", (f"SNR, {g.label}", f"snr_accumulated_{g.name}.png"))
                   for g, _ in analysis_groups(inputs.snr, inputs.runs)]
    return blocks


def _snr_items(inputs: ReportInputs) -> list[str]:
    items: list[str] = []
    if inputs.snr is None:
        return items
    for group, part in analysis_groups(inputs.snr, inputs.runs):
        m = group.method
        final = {c: v[-1] for c, v in snr_layer_series(part, m, "accumulated").items() if v}
        if not final:
            continue
        lo = min(final, key=lambda c: (final[c], c))
        hi = max(final, key=lambda c: (final[c], c))
        items.append(f"{group.label}: accumulated SNR after the last layer from "
                     f"{final[lo]:.2f} dB (calibrated on {lo}) to {final[hi]:.2f} dB (on {hi})")
        items += RA.snr_sentences(group.rows(inputs.runs), m, inputs.eval_langs)
    return items


def _headline(totals: dict[str, list[int]], paired: dict[str, dict[str, list[str]]]
              ) -> list[str]:
    lines = []
    for key, what in (("ppl", "perplexity"), ("tasks", "tasks")):
        for label, found in sorted(paired.get(key, {}).items()):
            lines.append(f"{label}, {what}: {headline(found)}.")
    for key, label in (("ppl", "the lowest perplexity"), ("tasks", "the best task score")):
        if key in totals and totals[key][1]:
            won, total = totals[key]
            lines.append(f"By point estimate: target-language calibration gives {label} in "
                         f"{won} of {total} (method, evaluation language"
                         f"{', task' if key == 'tasks' else ''}) cases ({100 * won / total:.0f}%;"
                         " ties count as best)" + ("." if key in paired else
                                                   "; no per-document records: no intervals."))
    return lines


def _sparsity_section(inputs: ReportInputs) -> list[Block]:
    grid = sorted({g.method for g in groups(inputs.runs) if g.sparsity is not None})
    if not grid:
        return []
    return [("h2", "Sparsity"), ("p", "Scores (mean over evaluation languages) against "
                                      "sparsity, one line per calibration row; dashed: dense.")
            ] + [("img", (f"sparsity, {m}", f"sparsity_{m}.png")) for m in grid]


def summary_blocks(inputs: ReportInputs, title: str,
                   compared: Compared | None = None) -> list[Block]:
    """The summary as blocks: headline counts first, then one section per analysis.

    Args:
        inputs: The report's inputs.
        title: The page title.
        compared: The paired comparisons (:func:`analysis.report_compare.compare_report`);
            None states point estimates only.
    """
    totals: dict[str, list[int]] = {}
    paired: dict[str, dict[str, list[str]]] = {}
    sections = _metric_section(inputs, "ppl", "Perplexity", "min", ".2f", totals, compared,
                               paired)
    for task in inputs.tasks:
        if has_metric(inputs.runs, task, list(inputs.eval_langs)):
            sections += _metric_section(inputs, task, f"Task {task}", "max", ".3f", totals,
                                        compared, paired)
    headline_lines = _headline(totals, paired)
    return [("h1", title), ("p", f"Sweep run {inputs.sweep_run}."), ("h2", "Headline"),
            ("ul", headline_lines or ["No pruned runs with same-language calibration."]),
            *sections, *_sparsity_section(inputs), *_iou_section(inputs),
            *_analysis_sections(inputs)]


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
            out.append("\n".join(f"- {item}" for item in _items(body)) + "\n")
        elif kind == "img" and _image(body)[1] in existing:
            alt, src = _image(body)
            out.append(f"![{alt}]({src})\n")
    return "\n".join(out)


def _items(body: object) -> list[str]:
    """A ``ul`` block's bullet texts."""
    return [str(item) for item in body] if isinstance(body, (list, tuple)) else [str(body)]


def _image(body: object) -> tuple[str, str]:
    """An ``img`` block's ``(alt, file)``."""
    if not (isinstance(body, tuple) and len(body) == 2):
        raise TypeError(f"an img block needs (alt, file), got {body!r}")
    return str(body[0]), str(body[1])


def render_html(blocks: Sequence[Block], existing: set[str], title: str) -> str:
    """A self-contained HTML page of the blocks (images by relative path), escaped."""
    esc = html.escape
    out = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">",
           f"<title>{esc(title)}</title></head><body>"]
    for kind, body in blocks:
        if kind in ("h1", "h2", "p"):
            out.append(f"<{kind}>{esc(str(body))}</{kind}>")
        elif kind == "ul":
            items = "".join(f"<li>{esc(i)}</li>" for i in _items(body))
            out.append(f"<ul>{items}</ul>")
        elif kind == "img" and _image(body)[1] in existing:
            alt, src = _image(body)
            out.append(f"<p><img src=\"{esc(src)}\" alt=\"{esc(alt)}\"></p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
