"""The engine on the real embedded Gemma 3 270M (opt-in: ``pytest -m slow``).

Needs the embedded model package installed (the first load converts the GGUF, ~1 minute).
Windows of 600 tokens are longer than Gemma's 512-token sliding window, so the sliding and
global layers really see different attention masks.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ModelCfg
from pipeline.engine import layerwise_forward
from pipeline.pruners import SparsityTarget
from pipeline.sparsity import sparsity_tables
from tests.tiny import prune_layerwise

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def gemma():
    from pipeline.loading import load_model

    return load_model(ModelCfg(device="cpu")).model


def test_layerwise_forward_matches_hidden_states_beyond_the_sliding_window(gemma):
    windows = torch.randint(10, 20000, (2, 600), generator=torch.Generator().manual_seed(0))
    assert gemma.config.sliding_window < windows.shape[1]
    with torch.no_grad():
        hs = gemma(windows, output_hidden_states=True).hidden_states
    checked = 0
    for step in layerwise_forward(gemma, windows, device=CPU, batch_size=2):
        if step.index < len(hs) - 2:
            torch.testing.assert_close(torch.cat(step.outputs), hs[step.index + 1],
                                       atol=1e-5, rtol=1e-4)
            checked += 1
    assert checked == gemma.config.num_hidden_layers - 1


def test_wanda_on_gemma_prunes_every_row_to_the_target(gemma):
    windows = torch.randint(10, 20000, (4, 128), generator=torch.Generator().manual_seed(1))
    result = prune_layerwise(gemma, windows, "wanda", SparsityTarget(0.5), device=CPU,
                             batch_size=4, progress=False)
    modules, _, overall = sparsity_tables(result)
    assert len(modules) == 7 * gemma.config.num_hidden_layers
    assert overall["sparsity"] == 0.5
    assert overall["preexisting_zero_fraction"] > 0.01  # dequantised 4-bit weights
    mask = result.masks["model.layers.0.mlp.down_proj"].unpack()
    assert (mask.sum(dim=1) == mask.shape[1] // 2).all()
