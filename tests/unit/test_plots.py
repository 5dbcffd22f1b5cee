"""Report figures: deterministic PNG bytes, best-cell stars, input checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest

from analysis import plots
from pipeline.errors import LangpruneError

LANGS = ["de", "en", "zh"]


def _matrix() -> pd.DataFrame:
    values = [[12.0, 30.5, 41.0], [14.5, 25.0, np.nan], [13.0, 33.0, 39.5]]
    return pd.DataFrame(values, index=LANGS, columns=LANGS)


def _draw_all(folder: Path) -> list[Path]:
    """Every plot helper once, with fixed inputs."""
    rng = np.random.default_rng(0)
    matrix = _matrix()
    iou = pd.DataFrame(
        [[0.8, 0.4, 0.35], [0.4, 0.75, 0.38], [0.35, 0.38, 0.7]], index=LANGS, columns=LANGS
    )
    return [
        plots.matrix_heatmap(
            matrix,
            folder / "ppl.png",
            title="perplexity",
            reference={"de": 9.0, "en": 11.0, "zh": 20.0},
        ),
        plots.iou_heatmap(iou, folder / "iou.png", sparsity=0.5),
        plots.layer_lines(
            {"de": [30.0, 20.0, np.inf], "en": [25.0, 18.0, 12.0]},
            folder / "snr.png",
            baseline=10.0,
            ylabel="SNR (dB)",
        ),
        plots.grouped_bars(matrix.fillna(0.0), folder / "bars.png", baseline=0.5),
        plots.lape_histograms(
            rng.uniform(0, 1.4, 500), {"en": rng.uniform(0, 1.4, 500)}, folder / "sub" / "lape.png"
        ),
    ]


def test_plots_are_byte_identical_across_calls_and_rc_changes(tmp_path):
    first = _draw_all(tmp_path / "a")
    with matplotlib.rc_context({"lines.linewidth": 5.0, "font.size": 20, "image.cmap": "gray"}):
        second = _draw_all(tmp_path / "b")
    for a, b in zip(first, second):
        data = a.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert b"matplotlib" not in data  # no Software/version metadata
        assert data == b.read_bytes(), a.name


def test_plots_are_byte_identical_in_a_fresh_process(tmp_path):
    here = _draw_all(tmp_path / "here")[:2]
    code = (
        "import sys; from pathlib import Path; from tests.unit.test_plots import _draw_all; "
        "_draw_all(Path(sys.argv[1]))"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "there")],
        check=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=120,
    )
    for path in here:
        assert path.read_bytes() == (tmp_path / "there" / path.name).read_bytes(), path.name


def test_different_inputs_give_different_pictures(tmp_path):
    a = plots.iou_heatmap(_matrix() / 50, tmp_path / "a.png", sparsity=0.5)
    b = plots.iou_heatmap(_matrix() / 50, tmp_path / "b.png", sparsity=0.6)
    assert a.read_bytes() != b.read_bytes()  # the baseline mark moved


def test_best_cells_per_column():
    matrix = _matrix()
    assert plots.best_cells(matrix, "min") == {"de": "de", "en": "en", "zh": "zh"}
    assert plots.best_cells(matrix, "max") == {"de": "en", "en": "zh", "zh": "de"}
    tied = pd.DataFrame({"x": [1.0, 1.0]}, index=["a", "b"])
    assert plots.best_cells(tied) == {"x": "a"}
    empty = pd.DataFrame({"x": [np.nan, np.nan]}, index=["a", "b"])
    assert plots.best_cells(empty) == {}
    with pytest.raises(LangpruneError):
        plots.best_cells(matrix, "lowest")


def test_lape_histograms_need_finite_values(tmp_path):
    with pytest.raises(LangpruneError):
        plots.lape_histograms([np.nan], {"en": [np.inf]}, tmp_path / "x.png")
