"""Tiny random-initialised causal LMs, one per supported family, for fast CPU tests.

Nothing is downloaded: each model is built from a config in memory. Sizes are small
(hidden 64, 2-4 layers, vocab 300) so a forward pass over a few short windows takes
milliseconds. Sliding-window families get a window shorter than :data:`SEQ_LEN`, so tests
exercise the per-layer attention masks; Gemma 3 mixes sliding and global layers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 300
HIDDEN = 64
SEQ_LEN = 24  # longer than every sliding window below
SLIDING = 8

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=128,
    num_attention_heads=4,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def _llama() -> PreTrainedModel:
    return LlamaForCausalLM(LlamaConfig(**_COMMON, num_hidden_layers=2, num_key_value_heads=2))


def _qwen2() -> PreTrainedModel:
    # Layer 0 full attention, layer 1 sliding: two different masks in one model.
    cfg = Qwen2Config(**_COMMON, num_hidden_layers=2, num_key_value_heads=2,
                      use_sliding_window=True, sliding_window=SLIDING,
                      layer_types=["full_attention", "sliding_attention"])
    return Qwen2ForCausalLM(cfg)


def _cohere() -> PreTrainedModel:
    # Cohere (Aya-23): parallel attention + MLP read the same normed input.
    return CohereForCausalLM(CohereConfig(**_COMMON, num_hidden_layers=2, num_key_value_heads=2))


def _mistral() -> PreTrainedModel:
    cfg = MistralConfig(**_COMMON, num_hidden_layers=2, num_key_value_heads=2,
                        sliding_window=SLIDING)
    return MistralForCausalLM(cfg)


def _gpt_neox() -> PreTrainedModel:
    cfg = GPTNeoXConfig(**_COMMON, num_hidden_layers=2, rotary_pct=0.25,
                        use_parallel_residual=True, hidden_dropout=0.0, attention_dropout=0.0)
    return GPTNeoXForCausalLM(cfg)


def _gemma3() -> PreTrainedModel:
    cfg = Gemma3TextConfig(
        **_COMMON,
        num_hidden_layers=4,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=SLIDING,
        layer_types=["sliding_attention", "sliding_attention", "full_attention",
                     "sliding_attention"],
    )
    return Gemma3ForCausalLM(cfg)


_BUILDERS: dict[str, Callable[[], PreTrainedModel]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "cohere": _cohere,
    "mistral": _mistral,
    "gpt_neox": _gpt_neox,
    "gemma3": _gemma3,
}
FAMILIES: list[str] = list(_BUILDERS)


def tiny_model(family: str, seed: int = 0) -> PreTrainedModel:
    """A tiny random-initialised causal LM of ``family`` (one of :data:`FAMILIES`), in eval mode.

    Args:
        family: Model family key, e.g. ``"llama"`` or ``"gemma3"``.
        seed: Seed of the weight initialisation; the same seed gives identical weights.
    """
    if family not in _BUILDERS:
        raise KeyError(f"unknown tiny family {family!r}; known: {', '.join(FAMILIES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _BUILDERS[family]()
    return model.eval()


def tiny_windows(n: int = 6, seq_len: int = SEQ_LEN, seed: int = 0) -> torch.Tensor:
    """Random token windows ``[n, seq_len]`` in the tiny vocabulary (never the pad token)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, seq_len), generator=gen)


def prune_layerwise(model, windows, method, target, *, sparsegpt_blocksize=128,
                    sparsegpt_percdamp=0.01, **kwargs):
    """The engine's driver for tests written against a method name: builds the pruner as
    :func:`pipeline.pruners.pruner_from_config` would, then calls
    :func:`pipeline.engine.prune_layerwise`."""
    from pipeline.engine import prune_layerwise as engine_prune
    from pipeline.pruners import LayerPruner, make_pruner

    pruner = method if isinstance(method, LayerPruner) else make_pruner(
        method, sparsegpt_blocksize=sparsegpt_blocksize, sparsegpt_percdamp=sparsegpt_percdamp)
    return engine_prune(model, windows, pruner, target, **kwargs)


def save_tiny_gemma(folder) -> None:
    """A tiny Gemma 3 (:func:`tiny_model`) with ByT5's byte tokenizer saved as a local HF
    folder; the vocabulary of 300 covers the byte ids."""
    from transformers import ByT5Tokenizer

    tiny_model("gemma3").save_pretrained(folder)
    ByT5Tokenizer().save_pretrained(folder)
