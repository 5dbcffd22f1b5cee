"""Generic structure and placement helpers for Hugging Face decoder LLMs (no loading).

Everything here reads the model itself (``_no_split_modules``, module classes), so a new
model family needs no code as long as its decoder layers sit in one ``nn.ModuleList``.
Loading models and tokenizers lives in :mod:`pipeline.loading`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from pipeline.errors import LangpruneError
from pipeline.registry import suggest

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# Config attributes that hold the longest sequence a model accepts, in order of preference.
_MAX_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Find the decoder layers of ``model`` and their qualified name.

    First looks for an ``nn.ModuleList`` whose members are all of a class named in
    ``model._no_split_modules`` (transformers' own list of "blocks that must stay on one
    device", which is exactly the decoder layer class). Otherwise falls back to the
    largest ``nn.ModuleList`` of at least two identical blocks that contain ``nn.Linear``.

    Args:
        model: A causal LM such as ``LlamaForCausalLM`` or a bare decoder model.

    Returns:
        ``(name, layers)``, e.g. ``("model.layers", ModuleList(...))``.

    Raises:
        LangpruneError: if neither rule finds the layers.
    """
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    tagged = [(n, m) for n, m in lists if all(type(c).__name__ in no_split for c in m)]
    if tagged:
        return _prefer_decoder(model, tagged)
    blocks = [
        (n, m)
        for n, m in lists
        if len(m) >= 2
        and len({type(c) for c in m}) == 1
        and any(isinstance(s, nn.Linear) for s in m[0].modules())
    ]
    if blocks:
        return _prefer_decoder(model, blocks)
    raise LangpruneError(
        f"cannot find the decoder layers of {type(model).__name__}: looked for an nn.ModuleList of "
        f"{sorted(no_split) or 'the _no_split_modules classes (none declared)'} and for an "
        "nn.ModuleList of >= 2 identical blocks containing nn.Linear"
    )


def _prefer_decoder(
    model: nn.Module, found: list[tuple[str, nn.ModuleList]]
) -> tuple[str, nn.ModuleList]:
    """Among candidate lists, prefer those inside ``model.get_decoder()``, then the longest."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    inside = {id(m) for m in decoder.modules()} if isinstance(decoder, nn.Module) else set()
    # max() keeps the first of equal keys, so the result is deterministic.
    return max(found, key=lambda nm: (id(nm[1]) in inside, len(nm[1])))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder layers of ``model`` (see :func:`find_decoder_layers`)."""
    return find_decoder_layers(model)[1]


def find_linears(module: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside ``module``, by qualified name relative to it, in module order."""
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}


def resolve_device(name: str) -> torch.device:
    """Turn a config device string (``auto``, ``cpu``, ``cuda``, ``cuda:N``) into a device.

    ``auto`` is CUDA when available, else CPU. Asking for CUDA on a machine without it is
    a :class:`LangpruneError`, not a silent fallback.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise LangpruneError(f"device {name!r} requested but CUDA is not available; use cpu")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LangpruneError(
                f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
        return dev
    raise LangpruneError(f"unknown device {name!r}; known: auto, cpu, cuda, cuda:N")


def resolve_dtype(name: str) -> torch.dtype:
    """Turn a config dtype string (``float32``, ``bfloat16``, ``float16``) into a torch dtype."""
    try:
        return DTYPES[name]
    except KeyError:
        known = list(DTYPES)
        raise LangpruneError(
            f"unknown dtype {name!r}; known: {', '.join(known)}{suggest(name, known)}"
        ) from None


def model_max_length(model: nn.Module) -> int | None:
    """The longest sequence the model's config allows, or ``None`` when it does not say."""
    config = getattr(model, "config", None)
    text_config = getattr(config, "get_text_config", None)
    if callable(text_config):
        config = text_config()
    for key in _MAX_LENGTH_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_device(module: nn.Module) -> torch.device:
    """The device of the first parameter of ``module`` (CPU for a module without parameters)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


# ---- placement ---------------------------------------------------------------------------


def move_module(module: nn.Module, device: torch.device) -> None:
    """Move ``module``'s parameters and buffers to ``device`` in place.

    The single placement primitive used by the layer-wise driver (tests spy on it).
    Parameters are moved by replacing ``.data`` so tied parameters stay tied.
    """
    module.to(device)


def move_tensors(
    module: nn.Module, device: torch.device, skip: Iterable[nn.Module] = ()
) -> None:
    """Move the parameters and buffers of ``module`` that are not inside ``skip`` modules.

    Used with offloading: the embeddings, rotary tables and norms go to the compute device
    while the decoder layers (``skip``) stay on the CPU. A weight tied between two modules
    (embeddings and ``lm_head``) is moved once and stays tied.
    """
    skipped = {id(t) for m in skip for t in (*m.parameters(), *m.buffers())}
    moved: dict[int, nn.Parameter] = {}
    with torch.no_grad():
        for sub in module.modules():
            for key, p in list(sub._parameters.items()):
                if p is None or id(p) in skipped or p.device == device:
                    continue
                if id(p) not in moved:
                    moved[id(p)] = _moved_parameter(p, device)
                sub._parameters[key] = moved[id(p)]
            for key, buf in list(sub._buffers.items()):
                if buf is not None and id(buf) not in skipped and buf.device != device:
                    sub._buffers[key] = buf.to(device)


def _moved_parameter(p: nn.Parameter, device: torch.device) -> nn.Parameter:
    """``p`` itself with its data on ``device``, or a new Parameter where torch forbids that."""
    data = p.data.to(device)
    try:
        p.data = data  # keeps the Parameter object (optimizers, ties) as Module.to does
        return p
    except RuntimeError:  # e.g. CPU -> meta: incompatible tensor types
        return nn.Parameter(data, requires_grad=p.requires_grad)


@contextmanager
def onloaded(module: nn.Module, device: torch.device, enabled: bool) -> Iterator[nn.Module]:
    """Move ``module`` to ``device`` for the block and back to its previous device after.

    With ``enabled=False`` this does nothing (the model already lives on ``device``).
    """
    if not enabled:
        yield module
        return
    home = model_device(module)
    move_module(module, device)
    try:
        yield module
    finally:
        move_module(module, home)


def output_embeddings(model: nn.Module) -> nn.Module:
    """The model's output layer (``lm_head``), through transformers' accessor."""
    return _embeddings(model, "get_output_embeddings")


def input_embeddings(model: nn.Module) -> nn.Module:
    """The model's token embedding, through transformers' accessor."""
    return _embeddings(model, "get_input_embeddings")


def weight_of(module: nn.Module) -> torch.Tensor:
    """A layer's ``weight`` parameter (typed: ``nn.Module.__getattr__`` is not)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise LangpruneError(f"{type(module).__name__} has no weight tensor")
    return weight


def _embeddings(model: nn.Module, accessor: str) -> nn.Module:
    get = getattr(model, accessor, None)
    module = get() if callable(get) else None
    if not isinstance(module, nn.Module):
        raise LangpruneError(f"{type(model).__name__} has no {accessor}(): not a causal LM")
    return module


def output_only_modules(model: nn.Module) -> list[nn.Module]:
    """Output embeddings (``lm_head``) whose weight is not tied to the input embeddings.

    Calibration never runs the ``lm_head``, so offloading need not move it.
    """
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    out = get_out() if callable(get_out) else None
    if not isinstance(out, nn.Module):
        return []
    inp = get_in() if callable(get_in) else None
    in_params = {id(p) for p in inp.parameters()} if isinstance(inp, nn.Module) else set()
    if any(id(p) in in_params for p in out.parameters()):
        return []
    return [out]


def set_weight(weight: torch.Tensor, pruned: torch.Tensor) -> None:
    """Make ``pruned`` the values of ``weight``: adopted when it is a separate tensor of the
    same layout (a copy would cost a pass over the matrix: 0.27 s of a 1.1 s Wanda prune of
    Gemma 3 270M on one CPU thread), else copied in."""
    old = weight.data
    if (pruned.data_ptr() != old.data_ptr() and pruned.shape == old.shape
            and pruned.dtype == old.dtype and pruned.device == old.device
            and pruned.is_contiguous() and old.is_contiguous()):
        weight.data = pruned.detach()
    else:
        old.copy_(pruned)


class DenseSnapshot:
    """A CPU copy of every decoder-layer weight, to restore the dense model between prunes.

    Sweeps and searches load the model once and prune it many times; restoring weights is
    much cheaper than reloading (and exact: the copy is bit-identical).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self._layers = decoder_layers(model)
        self._state = [
            {k: v.detach().to("cpu", copy=True) for k, v in layer.state_dict().items()}
            for layer in self._layers
        ]

    def restore(self) -> None:
        with torch.no_grad():
            for layer, state in zip(self._layers, self._state):
                layer.load_state_dict(state)
