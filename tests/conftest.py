"""Shared fixtures: a tiny model folder, a real local mlflow server."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.servers import MlflowServer


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def tiny_model_dir(tmp_path) -> Path:
    """A tiny random Llama with a byte-level tokenizer, saved as a local HF folder."""
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM
    import torch

    torch.manual_seed(0)
    tok = ByT5Tokenizer()
    cfg = LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=None, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
