"""Signal-to-noise ratio of the pruning error: SNR_dB = 10 log10(||Y||^2 / ||Y - Y'||^2).

Definitions (docs/science.md#snr-of-the-pruning-error): Y is the dense output
of a module or decoder layer and Y' the pruned output on evaluation-language text. *local*:
both get the same dense input; *accumulated*: each model runs on its own hidden states.

Sums of squares are accumulated in float64 (inputs of any float dtype are upcast chunk by
chunk), so long streams of float32 or bfloat16 outputs lose no precision. Edge cases are
explicit, never a division by zero:

- ``||Y - Y'||^2 == 0`` (identical outputs, including both all-zero): ``+inf``.
- ``||Y||^2 == 0`` but ``||Y - Y'||^2 > 0`` (zero signal, nonzero error): ``-inf``.
- NaN anywhere in the inputs gives NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import Tensor

# Elements per float64 chunk: bounds the upcast copies for very large activations.
_CHUNK = 1 << 22
KINDS = ("local", "accumulated")
TABLE_COLUMNS = ["layer", "eval_lang", "kind", "snr_db", "signal", "noise"]


def _sums_of_squares(y_dense: Tensor, y_pruned: Tensor) -> tuple[float, float]:
    """(sum Y^2, sum (Y - Y')^2) in float64."""
    if y_dense.shape != y_pruned.shape:
        raise ValueError(f"output shapes differ: {tuple(y_dense.shape)} vs {tuple(y_pruned.shape)}")
    flat_d = y_dense.detach().reshape(-1)
    flat_p = y_pruned.detach().reshape(-1).to(flat_d.device)
    signal = flat_d.new_zeros((), dtype=torch.float64)
    noise = flat_d.new_zeros((), dtype=torch.float64)
    for start in range(0, flat_d.numel(), _CHUNK):
        d = flat_d[start : start + _CHUNK].to(torch.float64)
        p = flat_p[start : start + _CHUNK].to(torch.float64)
        signal += torch.dot(d, d)
        diff = d - p
        noise += torch.dot(diff, diff)
    return float(signal), float(noise)


def snr_from_sums(signal: float, noise: float) -> float:
    """SNR in dB from ``sum Y^2`` and ``sum (Y - Y')^2``, with the module's edge cases."""
    if math.isnan(signal) or math.isnan(noise):
        return math.nan
    if noise == 0.0:
        return math.inf  # identical outputs: no error at all
    if signal == 0.0:
        return -math.inf  # error without signal
    return 10.0 * math.log10(signal / noise)


def snr_db(y_dense: Tensor, y_pruned: Tensor) -> float:
    """SNR of a pruned output against the dense one, in decibels.

    Args:
        y_dense: Dense output Y (any shape, any float dtype, any device).
        y_pruned: Pruned output Y' of the same shape.

    Returns:
        ``10 log10(||Y||^2 / ||Y - Y'||^2)``; ``inf`` if the outputs are identical, ``-inf``
        if Y is zero but Y' is not.

    Raises:
        ValueError: if the shapes differ.
    """
    return snr_from_sums(*_sums_of_squares(y_dense, y_pruned))


@dataclass
class SnrAccumulator:
    """Streaming SNR over batches: running float64 sums of Y^2 and (Y - Y')^2.

    Lifecycle: ``update`` once per batch (or ``merge`` partial accumulators), then read
    :attr:`snr_db`. Pooling sums (rather than averaging per-batch SNRs) makes the result
    independent of how the text was batched.

    Attributes:
        signal: Sum of squares of the dense outputs so far.
        noise: Sum of squares of the errors so far.
        numel: Number of output elements seen.
        windows: ``(signal, noise)`` of every window (row of the first dimension) seen, in
            order: the units :mod:`analysis.uncertainty` resamples.
    """

    signal: float = 0.0
    noise: float = 0.0
    numel: int = 0
    windows: list[tuple[float, float]] = field(default_factory=list)

    def update(self, y_dense: Tensor, y_pruned: Tensor) -> None:
        """Add one batch of dense and pruned outputs (same shape; rows are windows)."""
        if y_dense.shape != y_pruned.shape:
            raise ValueError(
                f"output shapes differ: {tuple(y_dense.shape)} vs {tuple(y_pruned.shape)}")
        rows = zip(y_dense, y_pruned) if y_dense.dim() > 1 else [(y_dense, y_pruned)]
        for d, p in rows:
            signal, noise = _sums_of_squares(d, p)
            self.windows.append((signal, noise))
            self.signal += signal
            self.noise += noise
        self.numel += y_dense.numel()

    def merge(self, other: SnrAccumulator) -> None:
        """Add another accumulator's sums (e.g. from another process or batch range)."""
        self.signal += other.signal
        self.noise += other.noise
        self.numel += other.numel
        self.windows += other.windows

    @property
    def snr_db(self) -> float:
        """SNR in dB of everything seen so far (see :func:`snr_from_sums`)."""
        if self.numel == 0:
            raise ValueError("SnrAccumulator has seen no outputs")
        return snr_from_sums(self.signal, self.noise)


def snr_table(
    local: Mapping[str, Sequence[SnrAccumulator]],
    accumulated: Mapping[str, Sequence[SnrAccumulator]],
) -> pd.DataFrame:
    """Tidy table of per-layer SNRs for every evaluation language.

    Args:
        local: Evaluation language -> one accumulator per decoder layer (index = layer),
            fed with both models on the same dense input.
        accumulated: The same for each model running on its own hidden states.

    Returns:
        Columns :data:`TABLE_COLUMNS` (``layer``, ``eval_lang``, ``kind`` in
        {local, accumulated}, ``snr_db``, and the raw ``signal``/``noise`` sums so tables can
        be pooled further); local rows first, then by language and layer.
    """
    rows = []
    for kind, by_lang in zip(KINDS, (local, accumulated)):
        for lang in sorted(by_lang):
            for layer, acc in enumerate(by_lang[lang]):
                rows.append([layer, lang, kind, acc.snr_db, acc.signal, acc.noise])
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def mean_snr_by_layer(table: pd.DataFrame) -> pd.DataFrame:
    """Pool a :func:`snr_table` over evaluation languages: one SNR per (kind, layer).

    Pools the sums (each language weighted by its output energy) instead of averaging dB
    values, which would be dominated by infinities and outliers.
    """
    sums = table.groupby(["kind", "layer"], sort=True)[["signal", "noise"]].sum().reset_index()
    sums["snr_db"] = [snr_from_sums(s, n) for s, n in zip(sums["signal"], sums["noise"])]
    return sums[["kind", "layer", "snr_db", "signal", "noise"]]
