"""``python -m pipeline`` with a pause point, so a test can inject a fault at a known moment.

Usage: ``python -m tests.fault_runner <command> key=value ...`` (the CLI's own arguments).
Environment:

- ``FAULT_PAUSE``: where to stop, ``hook:<i>`` (inside the first pruning input hook of decoder
  layer i: its forward pre-hooks are registered, layers before it are pruned), ``save`` (in the
  middle of writing the mask file: half of it is on disk under its temporary name) or
  ``trial:<n>`` (inside search trial number n).
- ``FAULT_MARKER``: file written (with this pid) once the pause point is reached.
- ``FAULT_GO``: if set, the process waits until this file exists and then continues;
  otherwise it waits until a signal ends it.
- ``FAULT_REPORT``: JSON written when the CLI returns: its exit status and the forward hooks
  and instance-level ``forward`` overrides left on the pruned model.

Nothing here changes what the pipeline does; it only waits at one point.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

_models: list[Any] = []


MAX_PAUSE_S = 1800  # a victim whose test died without killing it does not linger


def _reached() -> None:
    Path(os.environ["FAULT_MARKER"]).write_text(str(os.getpid()))
    go = os.environ.get("FAULT_GO")
    deadline = time.monotonic() + MAX_PAUSE_S
    while not (go and Path(go).exists()):
        if time.monotonic() > deadline:
            os._exit(3)
        time.sleep(0.1)  # signals are handled between these sleeps


def _install(spec: str) -> None:
    import pipeline.engine as engine
    import pipeline.engine.prune as capture

    real_prune = engine.prune_layerwise

    def prune_layerwise(model: Any, *args: Any, **kwargs: Any) -> Any:
        _models.append(model)
        return real_prune(model, *args, **kwargs)

    engine.prune_layerwise = prune_layerwise
    kind, _, arg = spec.partition(":")
    if kind == "hook":
        real_layer, real_hooks, layer_now = (capture._prune_calibrated_layer,
                                             capture.input_hooks, [-1])

        def prune_calibrated_layer(run: Any, layer: Any, inputs: Any, index: int,
                                   *args: Any) -> Any:
            layer_now[0] = index
            return real_layer(run, layer, inputs, index, *args)

        def input_hooks(modules: Any, fn: Any) -> Any:
            def watched(name: str, x: Any) -> None:
                if layer_now[0] == int(arg):
                    layer_now[0] = -1  # pause once
                    _reached()
                fn(name, x)

            return real_hooks(modules, watched)

        capture._prune_calibrated_layer = prune_calibrated_layer
        capture.input_hooks = input_hooks
    elif kind == "save":
        from pipeline import masks

        real_save = masks.save_file

        def save_file(tensors: Any, path: str, metadata: Any = None) -> None:
            real_save(tensors, path, metadata=metadata)
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])  # half written, as when killed
            _reached()
            Path(path).write_bytes(data)

        masks.save_file = save_file
    elif kind == "trial":
        from jobs.search import trials

        real_trial = trials._fast_trial

        def fast_trial(ctx: Any, point: Any) -> Any:
            if ctx.current_trial == int(arg):
                _reached()
            return real_trial(ctx, point)

        trials._fast_trial = fast_trial
    else:
        raise SystemExit(f"unknown FAULT_PAUSE {spec!r}")


def _hooks_left() -> dict[str, int]:
    hooks = forwards = 0
    for model in _models:
        for module in model.modules():
            hooks += len(module._forward_hooks) + len(module._forward_pre_hooks)
            forwards += "forward" in vars(module)
    return {"hooks": hooks, "forward_overrides": forwards, "models": len(_models)}


def main() -> int:
    # Ctrl-C as in a terminal, however the test run was launched: a process started in the
    # background of a non-interactive shell (``nohup ... &``) inherits SIGINT as *ignored*,
    # and Python then keeps ignoring it, so the SIGINT test could never end its victim.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _install(os.environ["FAULT_PAUSE"])
    from jobs.cli import main as cli_main

    rc = 1
    try:
        rc = cli_main(sys.argv[1:])
        return rc
    finally:
        report = os.environ.get("FAULT_REPORT")
        if report:
            Path(report).write_text(json.dumps({"rc": rc, **_hooks_left()}))


if __name__ == "__main__":
    sys.exit(main())
