"""The command line: ``python -m pipeline <command> [--config FILE] [key=value ...]``.

The only module that reads ``argv``. Every command takes the same flat ``key=value``
overrides of :class:`pipeline.config.Config` (the MLproject entry points pass theirs this
way), so the CLI never re-declares config fields. A :class:`LangpruneError` prints one line,
``error: ...``, and exits with status 2; SIGTERM/SIGINT end the active run KILLED.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.config import COMMAND_DEFAULTS, Config
from pipeline.errors import LangpruneError
from tracking.reliability import apply_http_retry_defaults

log = logging.getLogger("langprune")

COMMANDS: dict[str, str] = {
    "main": "prune with the calibration blend, evaluate every language (tracked run)",
    "dense": "evaluate the unpruned model (the baseline every pruned run compares with)",
    "sweep": "the grid calibration languages x methods x calib_sets under one parent run",
    "analyze": "IoU across a sweep's runs; SNR, LSAR and LAPE for runs that lack them",
    "report": "paper-style matrices, figures and summary from the MLflow store alone",
    "search": "Optuna search for calibration blends that beat target-only calibration",
    "config": "print the resolved config as YAML and its hash, then exit",
    "reap": "mark RUNNING runs whose process is gone as FAILED",
}


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """``['calib_lang=zh', 'sparsity=0.6']`` -> ``{'calib_lang': 'zh', 'sparsity': '0.6'}``."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LangpruneError(f"expected key=value, got {item!r}")
        out[key.strip()] = value
    return out


def build_config(config_file: str | None, items: Sequence[str], command: str = "") -> Config:
    """The config of one command: its :data:`COMMAND_DEFAULTS`, then the YAML file, then
    ``key=value`` overrides (later wins)."""
    defaults = COMMAND_DEFAULTS.get(command, {})
    overrides = parse_overrides(items)
    if config_file:
        return Config.from_yaml(config_file, overrides, defaults)
    return Config.from_overrides({**defaults, **overrides})


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", default=None, help="flat YAML of key: value (optional)")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help=f"config overrides; keys: {', '.join(Config.keys())}")
    return ap


def _on_signal(signum: int, frame: Any) -> None:
    from tracking.runs import Interrupted

    raise Interrupted(f"received signal {signal.Signals(signum).name}")


def _cmd_main(cfg: Config) -> None:
    from jobs.main import run_main

    run_main(cfg)


def _cmd_dense(cfg: Config) -> None:
    from jobs.main import preflight, run_dense

    preflight(cfg)
    run_dense(cfg)


def _cmd_sweep(cfg: Config) -> None:
    from jobs.sweep import run_sweep

    run_sweep(cfg)


def _cmd_analyze(cfg: Config) -> None:
    from jobs.analyze import run_analyze

    run_analyze(cfg)


def _cmd_report(cfg: Config) -> None:
    from jobs.report import run_report

    run_report(cfg)


def _cmd_search(cfg: Config) -> None:
    from jobs.search import run_search

    run_search(cfg)


def _cmd_config(cfg: Config) -> None:
    print(cfg.to_yaml() + f"# config_hash: {cfg.config_hash()}")


def _cmd_reap(cfg: Config) -> None:
    from tracking.runs import experiment_id, reap_stale_runs

    ids = reap_stale_runs(experiment_id(cfg.run.experiment))
    print(f"marked {len(ids)} stale run(s) FAILED" + (": " + " ".join(ids) if ids else ""))


HANDLERS: dict[str, Callable[[Config], None]] = {
    "main": _cmd_main,
    "dense": _cmd_dense,
    "sweep": _cmd_sweep,
    "analyze": _cmd_analyze,
    "report": _cmd_report,
    "search": _cmd_search,
    "config": _cmd_config,
    "reap": _cmd_reap,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("LANGPRUNE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    apply_http_retry_defaults()  # ride out a tracking server restart (README "Reliability")
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        cfg = build_config(args.config, args.overrides, args.command)
        HANDLERS[args.command](cfg)
    except LangpruneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BaseException as e:
        from tracking.runs import Interrupted

        if isinstance(e, Interrupted):
            print(f"stopped: {e}", file=sys.stderr)
            return 143
        raise
    return 0
