"""Small per-run figures logged with each run (the paper-style figures live in the report)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def ppl_vs_dense(pruned: Mapping[str, float], dense: Mapping[str, float], path: Path,
                 title: str = "") -> Path:
    """Grouped bars: perplexity per evaluation language, dense vs pruned (log scale)."""
    langs = [lang for lang in pruned if lang in dense]
    x = np.arange(len(langs))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(langs) + 2), 3.2), dpi=100)
    ax.bar(x - 0.2, [dense[k] for k in langs], 0.4, label="dense", color="#888888")
    ax.bar(x + 0.2, [pruned[k] for k in langs], 0.4, label="pruned", color="#1f77b4")
    for i, lang in enumerate(langs):
        ax.annotate(f"x{pruned[lang] / dense[lang]:.2f}", (x[i] + 0.2, pruned[lang]),
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, langs)
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log)")
    ax.set_title(title or "perplexity per language", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path
