"""Paused forwards: one forward of a decoder layer per batch, each stopping before chosen
linears until the driver lets it go on. The machinery behind one-pass ``true_sequential``.

Sequential pruning needs, for each group of linears in forward order, the statistic of the
group's inputs over *all* calibration batches, computed with the groups before it already
pruned; the layer's output must then come from the fully pruned layer. Re-running the layer
once per group gives that at the price of one partial forward per group plus one to
propagate. Here every batch's forward runs once: it pauses at the first linear of each
group (its inputs are recorded by then), the driver prunes the group once every batch has
arrived, and the forwards continue with the pruned weights. The values computed are the
ones the re-run gives (same inputs, same operations, same order).

A forward cannot be suspended in Python without a stack of its own, so each batch runs in
a thread. The threads run one at a time (each is resumed and waited for in turn), so
statistics are fed from one thread at a time, results do not depend on scheduling, and the
math libraries' own thread pools are not oversubscribed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType

import torch
from torch import Tensor, nn

from pipeline.engine.groups import input_hooks
from pipeline.engine.inputs import LayerInput


class _Abort(BaseException):
    """Private: ends a paused forward when the driver stops early (error or interrupt)."""


class _Batch(threading.Thread):
    """One batch's forward through the layer, run in steps by :class:`PausedForwards`."""

    def __init__(self, layer: nn.Module, inp: LayerInput, index: int) -> None:
        super().__init__(daemon=True, name=f"langprune-layer{index}-batch")
        self._layer, self._inp, self._index = layer, inp, index
        self._go = threading.Semaphore(0)
        self._paused = threading.Semaphore(0)
        self.output: Tensor | None = None
        self.error: BaseException | None = None
        self.at: str | None = None  # where the forward waits; None once it has finished
        self.abort = False
        self.seen: set[str] = set()

    def run(self) -> None:
        self._go.acquire()
        try:
            if self.abort:
                return
            with torch.inference_mode():  # grad mode is per thread
                self.output = self._inp.call(self._layer, self._index)
        except _Abort:
            pass
        except BaseException as e:  # handed to the driver's thread by step()
            self.error = e
        finally:
            self.at = None
            self._paused.release()

    def pause(self, name: str) -> None:
        """In this batch's thread: wait before ``name`` until the driver resumes it."""
        self.at = name
        self._paused.release()
        self._go.acquire()
        if self.abort:
            raise _Abort

    def step(self) -> str | None:
        """In the driver's thread: run to the next pause; where it waits (None: finished)."""
        self._go.release()
        self._paused.acquire()
        if self.error is not None:
            raise self.error
        return self.at


class PausedForwards:
    """One forward of ``layer`` per captured batch, each pausing before every module of
    ``pause_at`` the first time that module is called in the forward.

    Args:
        layer: The decoder layer (or a stand-in).
        inputs: The captured batches; their hidden states are the layer's inputs.
        index: The layer's index (selects each batch's keyword inputs).
        pause_at: Modules (by name) to pause before.
        on_pause: Called as ``on_pause(name, x)`` with the module's input, in the batch's
            thread, just before it pauses (one batch at a time).

    Use as a context manager; :meth:`advance` moves every batch to its next pause. Later
    calls of a ``pause_at`` module in the same forward neither pause nor call ``on_pause``.
    """

    def __init__(self, layer: nn.Module, inputs: Sequence[LayerInput], index: int,
                 pause_at: Mapping[str, nn.Module],
                 on_pause: Callable[[str, Tensor], None]) -> None:
        self._batches = [_Batch(layer, inp, index) for inp in inputs]
        self._on_pause = on_pause
        self._hooks = input_hooks(pause_at, self._hook)

    def _hook(self, name: str, x: Tensor) -> None:
        batch = threading.current_thread()
        if isinstance(batch, _Batch) and name not in batch.seen:
            batch.seen.add(name)
            self._on_pause(name, x)
            batch.pause(name)

    def __enter__(self) -> PausedForwards:
        self._hooks.__enter__()
        for batch in self._batches:
            batch.start()
        return self

    def advance(self) -> list[str | None]:
        """Resume each batch in turn until its next pause; where each one waits now."""
        return [batch.step() for batch in self._batches]

    def outputs(self) -> list[Tensor]:
        """The layer's output per batch, once every forward has finished."""
        out = [b.output for b in self._batches]
        if any(o is None for o in out):
            raise RuntimeError("outputs() before every forward finished")
        return [o for o in out if o is not None]

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for batch in self._batches:
            if batch.is_alive():
                batch.abort = True
                batch._go.release()
        for batch in self._batches:
            batch.join()
        self._hooks.__exit__(exc_type, exc, tb)
