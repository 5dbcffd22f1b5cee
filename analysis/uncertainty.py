"""Bootstrap intervals of the per-run analysis headlines: SNR and LSAR per layer band.

Units are the analysis windows (SNR) and the parallel LSAR sentences; each language's units
are resampled separately (a stratified percentile bootstrap, :data:`RESAMPLES` draws from a
Generator seeded with the run's ``seed``), so the same inputs give the same intervals. Every
statistic is a ratio of sums over the resampled units, so a band pools its layers' sums
exactly as the point estimate does:

- SNR of a band: ``10 log10(sum signal / sum noise)`` over the band's layers and the windows;
- LSAR relative change of a part: ``sum ||part(dense - pruned)|| / sum ||dense||`` over the
  band's layers and the sentences (a share of the dense feature norm, so it has a unit);
- ``lsar.rel.agnostic.midlate_minus_early``: the middle-and-late thirds' relative agnostic
  change minus the early third's, on the same resample.

Layer bands are the early / middle / late thirds (``numpy.array_split`` of the layers).
Metric names: the headline, then ``.ci95_low`` / ``.ci95_high``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from numpy.typing import NDArray
from torch import Tensor

from analysis import lsar as LS
from analysis import snr as S

BANDS = ("early", "middle", "late")
RESAMPLES = 2000
CONFIDENCE = 0.95
Array = NDArray[np.float64]
Stat = Callable[[Array], Array]


def layer_bands(n_layers: int) -> dict[str, list[int]]:
    """Early / middle / late thirds of ``n_layers`` decoder layers (sizes differ by <= 1);
    a band without layers (fewer than three layers) is left out."""
    parts = np.array_split(np.arange(n_layers), len(BANDS))
    return {band: [int(i) for i in part] for band, part in zip(BANDS, parts) if len(part)}


def stratified_weights(sizes: Sequence[int], resamples: int, seed: int) -> Array:
    """``[resamples, sum(sizes)]`` bootstrap counts, each stratum resampled on its own."""
    rng = np.random.default_rng(seed)
    blocks = [rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(float)
              for n in sizes]
    return np.concatenate(blocks, axis=1)


def interval(stat: Stat, weights: Array) -> tuple[float, float, float]:
    """``(value, low, high)``: ``stat`` on unit weights 1 and the bootstrap's percentiles.

    ``stat`` maps ``[B, n]`` weights to ``B`` values; non-finite replicates are kept in the
    quantiles (numpy orders +inf last), so an interval can reach infinity honestly.
    """
    value = float(stat(np.ones((1, weights.shape[1])))[0])
    boot = stat(weights)
    if np.isnan(boot).any():
        return value, math.nan, math.nan
    alpha = (1 - CONFIDENCE) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha])
    return value, float(low), float(high)


def _put(out: dict[str, float], name: str, ival: tuple[float, float, float]) -> None:
    out[name], out[f"{name}.ci95_low"], out[f"{name}.ci95_high"] = ival


def _snr_stat(signal: Array, noise: Array) -> Stat:
    def stat(w: Array) -> Array:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.asarray(10.0 * np.log10((w @ signal) / (w @ noise)), dtype=float)
    return stat


def snr_intervals(
    local: Mapping[str, Sequence[S.SnrAccumulator]],
    accumulated: Mapping[str, Sequence[S.SnrAccumulator]],
    seed: int, resamples: int = RESAMPLES,
) -> dict[str, float]:
    """``snr_local|snr_acc.band.<band>[.<lang>]`` with intervals over windows."""
    out: dict[str, float] = {}
    for name, by_lang in (("snr_local", local), ("snr_acc", accumulated)):
        langs = sorted(by_lang)
        bands = layer_bands(len(by_lang[langs[0]]))
        sums = {lang: np.array([[acc.windows[w] for w in range(len(accs[0].windows))]
                                for acc in accs]) for lang, accs in by_lang.items()}
        # sums[lang]: [layers, windows, 2] (signal, noise)
        for band, layers in bands.items():
            per = {lang: sums[lang][layers].sum(axis=0) for lang in langs}
            for lang in langs:
                w = stratified_weights([per[lang].shape[0]], resamples, seed)
                _put(out, f"{name}.band.{band}.{lang}", interval(
                    _snr_stat(per[lang][:, 0], per[lang][:, 1]), w))
            pooled = np.concatenate([per[lang] for lang in langs])
            w = stratified_weights([per[lang].shape[0] for lang in langs], resamples, seed)
            _put(out, f"{name}.band.{band}", interval(
                _snr_stat(pooled[:, 0], pooled[:, 1]), w))
    return out


def _ratio_stat(num: Array, den: Array) -> Stat:
    return lambda w: np.asarray((w @ num) / (w @ den), dtype=float)


def _norms(dense: Sequence[Mapping[str, Tensor]], pooled: Mapping[str, Sequence[Tensor]],
           bases: Sequence[LS.LsarBasis], lang: str) -> Array:
    """``[layers, sentences, 3]``: agnostic and specific change norms, dense state norm."""
    rows = []
    for layer, basis in enumerate(bases):
        agn, spec, ref = LS.change_norms(dense[layer][lang], pooled[lang][layer], basis)
        rows.append(np.stack([agn.numpy(), spec.numpy(), ref.numpy()], axis=-1))
    return np.asarray(rows, dtype=float)


def lsar_intervals(
    dense: Sequence[Mapping[str, Tensor]], pooled: Mapping[str, Sequence[Tensor]],
    bases: Sequence[LS.LsarBasis], seed: int, resamples: int = RESAMPLES,
) -> dict[str, float]:
    """``lsar.rel.<part>[.band.<band>][.<lang>]`` and the mid-late vs early agnostic shift."""
    out: dict[str, float] = {}
    langs = sorted(pooled)
    if not bases or not langs:
        return out
    norms = {lang: _norms(dense, pooled, bases, lang) for lang in langs}
    groups = {"": list(range(len(bases))), **{f".band.{b}": ls
                                                for b, ls in layer_bands(len(bases)).items()}}
    sizes = [norms[lang].shape[1] for lang in langs]
    for suffix, layers in groups.items():
        per = {lang: norms[lang][layers].sum(axis=0) for lang in langs}
        pooled_units = np.concatenate([per[lang] for lang in langs])
        for k, part in enumerate(("agnostic", "specific")):
            for lang in langs:
                w = stratified_weights([per[lang].shape[0]], resamples, seed)
                _put(out, f"lsar.rel.{part}{suffix}.{lang}",
                     interval(_ratio_stat(per[lang][:, k], per[lang][:, 2]), w))
            w = stratified_weights(sizes, resamples, seed)
            _put(out, f"lsar.rel.{part}{suffix}",
                 interval(_ratio_stat(pooled_units[:, k], pooled_units[:, 2]), w))
    _put(out, "lsar.rel.agnostic.midlate_minus_early", _midlate_shift(norms, langs, sizes,
                                                                      len(bases), seed, resamples))
    return out


def _midlate_shift(norms: Mapping[str, Array], langs: Sequence[str], sizes: Sequence[int],
                   n_layers: int, seed: int, resamples: int) -> tuple[float, float, float]:
    bands = layer_bands(n_layers)
    late = bands.get("middle", []) + bands.get("late", [])
    if not late or "early" not in bands:
        return math.nan, math.nan, math.nan
    early = np.concatenate([norms[lang][bands["early"]].sum(axis=0) for lang in langs])
    later = np.concatenate([norms[lang][late].sum(axis=0) for lang in langs])

    def stat(w: Array) -> Array:
        return np.asarray((w @ later[:, 0]) / (w @ later[:, 2])
                          - (w @ early[:, 0]) / (w @ early[:, 2]), dtype=float)

    return interval(stat, stratified_weights(sizes, resamples, seed))
