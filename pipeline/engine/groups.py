"""Input groups: the linears of a decoder layer that read the same input tensor (q/k/v)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from torch import Tensor, nn

from pipeline.engine.inputs import LayerInput
from pipeline.errors import LangpruneError


@dataclass(frozen=True)
class InputGroup:
    """Linear modules of one layer that read the same input tensor, in forward order.

    Attributes:
        names: Member names relative to the layer, in call order.
        last_call: Position of the group's last member call among all linear calls of one
            forward of the layer.
        stop: ``(name, occurrence)`` of that last call: a statistics pass for this group can
            end right after it.
    """

    names: tuple[str, ...]
    last_call: int
    stop: tuple[str, int]


def discover_input_groups(
    layer: nn.Module, linears: Mapping[str, nn.Module], inp: LayerInput, index: int
) -> list[InputGroup]:
    """Group ``linears`` by the identity of their input tensor during one forward of ``layer``.

    Groups are ordered by their first call, members by call order; this is both the
    statistics sharing (q/k/v read one tensor) and the order of ``true_sequential``.

    Raises:
        LangpruneError: if a linear is never called (it cannot be calibrated).
    """
    seen: list[tuple[Tensor, list[str]]] = []
    order: list[str] = []

    def record(name: str, x: Tensor) -> None:
        order.append(name)
        for tensor, names in seen:
            if tensor is x:
                if name not in names:
                    names.append(name)
                return
        if not any(name in names for _, names in seen):
            seen.append((x, [name]))

    with input_hooks(linears, record):
        inp.call(layer, index)
    unused = [n for n in linears if n not in order]
    if unused:
        raise LangpruneError(
            f"decoder layer {index}: {', '.join(unused)} never ran during the forward pass, so "
            "it cannot be calibrated"
        )
    groups = []
    for _, names in seen:
        last = max(k for k, called in enumerate(order) if called in names)
        stop = (order[last], order[: last + 1].count(order[last]))
        groups.append(InputGroup(tuple(names), last, stop))
    return groups


def discover_groups(
    layer: nn.Module, linears: Mapping[str, nn.Module], candidates: Sequence[LayerInput],
    index: int,
) -> list[InputGroup]:
    """:func:`discover_input_groups` on the first of ``candidates`` that calls every linear.

    The driver passes a probe of a few tokens first (its forward costs ~1/100 of a
    calibration batch's; the grouping is the code's, not the data's) and a real batch last,
    for layers that skip a linear on so few tokens (a mixture-of-experts router sending them
    to some experts only). The last candidate's error is the one raised.
    """
    for inp in candidates[:-1]:
        try:
            return discover_input_groups(layer, linears, inp, index)
        except LangpruneError:
            continue
    return discover_input_groups(layer, linears, candidates[-1], index)


@contextmanager
def input_hooks(
    modules: Mapping[str, nn.Module], fn: Callable[[str, Tensor], None]
) -> Iterator[None]:
    """Call ``fn(name, input)`` before each forward of the named modules; hooks always removed."""
    handles = [
        m.register_forward_pre_hook(lambda _m, args, _name=name: fn(_name, args[0]))
        for name, m in modules.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
