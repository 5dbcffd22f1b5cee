"""Generic model structure helpers: decoder layers, linears, devices, dtypes, max length."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.errors import LangpruneError
from pipeline.models import (
    decoder_layers,
    find_decoder_layers,
    find_linears,
    model_max_length,
    move_tensors,
    output_only_modules,
    resolve_device,
    resolve_dtype,
)
from tests.tiny import FAMILIES, tiny_model

LINEARS_PER_LAYER = {"gpt_neox": 4}  # fused query_key_value; the others have q/k/v/o + 3 MLP


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_layers_are_found_for_every_family(family):
    model = tiny_model(family)
    name, layers = find_decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    assert name.endswith("layers") and model.get_submodule(name) is layers
    assert all(type(layer).__name__ in model._no_split_modules for layer in layers)
    linears = find_linears(layers[0])
    assert len(linears) == LINEARS_PER_LAYER.get(family, 7)
    assert all(isinstance(m, nn.Linear) for m in linears.values())


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(LangpruneError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(LangpruneError, match="unknown device"):
        resolve_device("tpu")
    assert resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(LangpruneError, match="did you mean bfloat16"):
        resolve_dtype("bfloat61")


def test_model_max_length():
    assert model_max_length(tiny_model("gemma3")) == 256
    assert model_max_length(nn.Linear(2, 2)) is None


def test_move_tensors_skips_layers_and_keeps_ties():
    model = tiny_model("gemma3")  # tied lm_head / embeddings
    assert output_only_modules(model) == []
    llama = tiny_model("llama")  # untied: calibration never needs its lm_head
    assert output_only_modules(llama) == [llama.lm_head]
    layers = decoder_layers(model)
    move_tensors(model, torch.device("meta"), skip=layers)
    assert model.model.embed_tokens.weight.device.type == "meta"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(p.device.type == "cpu" for p in layers.parameters())


def test_set_weight_adopts_a_separate_tensor_and_copies_anything_else():
    import torch

    from pipeline.models import set_weight

    lin = torch.nn.Linear(4, 3, bias=False)
    param = lin.weight
    fresh = torch.arange(12.0).reshape(3, 4)
    set_weight(param, fresh)
    assert lin.weight is param and param.data_ptr() == fresh.data_ptr()  # adopted, no copy
    transposed = torch.ones(4, 3).t()  # not contiguous: copied into place
    set_weight(param, transposed)
    assert param.data_ptr() == fresh.data_ptr() and torch.equal(param, torch.ones(3, 4))
    set_weight(param, param.data.mul_(2))  # the weight itself: nothing to do but keep it
    assert torch.equal(param, torch.full((3, 4), 2.0))
