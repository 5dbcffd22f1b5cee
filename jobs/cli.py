"""The command line: ``python -m pipeline <command> [--config FILE] [key=value ...]``.

The only module that reads ``argv``. Every command takes the same flat ``key=value``
overrides of :class:`pipeline.config.Config` (the MLproject entry points pass theirs this
way), so the CLI never re-declares config fields. A :class:`LangpruneError` prints one line,
``error: ...``, and exits with status 2; SIGTERM/SIGINT end the active run KILLED.
``python -m pipeline <command> --help`` lists the keys that command uses, each with its
default and the comment of its field in :mod:`pipeline.config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from pipeline.config import COMMAND_DEFAULTS, SECTIONS, Config, canonical
from pipeline.errors import LangpruneError
from pipeline.host_memory import keep_freed_memory
from tracking.launch import launched_experiment_id, launched_run_id
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
    "check": "check in seconds that the tracking store answers (run it before `mlflow run`)",
}

# What each command reads: config sections (see pipeline.config.SECTIONS) or single keys.
# ``--help`` lists these keys; every key is still accepted everywhere.
COMMAND_KEYS: dict[str, tuple[str, ...]] = {
    "main": ("model", "calib", "prune", "eval", "run"),
    "dense": ("model", "eval", "run"),
    "sweep": ("model", "calib", "prune", "eval", "sweep", "run"),
    "analyze": ("analysis", "run", "device", "dtype", "offload", "model_cache"),
    "report": ("analysis", "run"),
    "search": ("model", "calib", "prune", "eval", "search", "run"),
    "config": tuple(SECTIONS),
    "reap": ("experiment",),
    "check": ("experiment",),
}
# Commands that prune: sparsity=0 is refused there (it is a valid target in the library).
PRUNING_COMMANDS = ("main", "sweep", "search")
# Commands that read or write the store (their `experiment` follows `mlflow run`'s).
TRACKED_COMMANDS = ("main", "dense", "sweep", "analyze", "report", "search", "reap", "check")


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


# A field line of a config dataclass with its trailing comment: "    name: type = ...  # why".
_FIELD_COMMENT = re.compile(r"^\s+(\w+)\s*:[^=#]+=.*?#\s*(.+?)\s*$")


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its trailing ``# ...`` comment in the source of ``cls`` (the config
    dataclasses document every field that way; nothing is written twice)."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):  # no source (e.g. a zipped install): keys without comments
        return {}
    return {m.group(1): m.group(2) for m in map(_FIELD_COMMENT.match, lines) if m}


def command_keys(command: str) -> list[tuple[str, str, str]]:
    """``(key, default, comment)`` for every key ``command`` uses (:data:`COMMAND_KEYS`),
    with the command's own defaults (:data:`COMMAND_DEFAULTS`) applied."""
    overrides = COMMAND_DEFAULTS.get(command, {})
    wanted = COMMAND_KEYS.get(command, tuple(SECTIONS))
    out = []
    for sec, typ in SECTIONS.items():
        comments = field_comments(typ)
        for f in dataclasses.fields(typ):
            if sec not in wanted and f.name not in wanted:
                continue
            if f.name in overrides:
                value = overrides[f.name]
            elif f.default is not dataclasses.MISSING:
                value = f.default
            else:
                value = f.default_factory()  # type: ignore[misc]
            out.append((f.name, canonical(value) or "''", comments.get(f.name, "")))
    return out


def keys_help(command: str) -> str:
    """The key listing of ``command --help``: ``key=default  comment``, one per line."""
    rows = command_keys(command)
    if not rows:
        return ""
    width = min(max(len(k) + len(v) + 1 for k, v, _ in rows), 38)
    lines = [f"keys of {command} (key=default):"]
    for key, default, comment in rows:
        item = f"{key}={default}"
        pad = " " * max(width - len(item), 0)
        lines.append(f"  {item}{pad}  {comment}".rstrip() if comment else f"  {item}")
    return "\n".join(lines)


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser; its key listing is built only when help is shown."""

    command = ""

    def format_help(self) -> str:
        if self.command and self.epilog is None:
            self.epilog = keys_help(self.command)
        return super().format_help()


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.command = name
        p.add_argument("--config", default=None, help="flat YAML of key: value (optional)")
        p.add_argument("--verbose", action="store_true",
                       help="every log line of every library (also LANGPRUNE_LOG=debug)")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config overrides (the keys this command uses are listed below)")
    return ap


def explicit_keys(config_file: str | None, items: Sequence[str]) -> set[str]:
    """The keys the user set, in ``--config`` or as ``key=value`` (not defaults)."""
    keys = set(parse_overrides(items))
    if config_file:
        try:
            data = yaml.safe_load(open(config_file, encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            data = {}  # build_config has already reported an unreadable file
        keys |= set(data) if isinstance(data, dict) else set()
    return keys


def check_command(command: str, cfg: Config) -> None:
    """Refusals that depend on the command, not on the config alone.

    Raises:
        LangpruneError: ``sparsity=0`` for a pruning command, or a ``calib_source`` that is
            not calibration text (listing only the calibration sources).
    """
    if command not in PRUNING_COMMANDS:
        return
    sparsities = [cfg.prune.sparsity]
    if command == "sweep":  # a sweep grid of sparsities (sweep_sparsities) replaces it
        sparsities = list(getattr(cfg.sweep, "sparsity_list", None) or sparsities)
    if 0 in sparsities and cfg.prune.pattern == "unstructured":
        raise LangpruneError(
            "sparsity=0 prunes nothing; use `dense` for the unpruned baseline")
    from pipeline.data.documents import CALIBRATION
    from pipeline.data.sources import get_source

    get_source(cfg.calib.calib_source, role=CALIBRATION)


def adopt_experiment(cfg: Config, explicit: set[str]) -> Config:
    """Make ``experiment`` name the experiment the runs really go to.

    Under ``mlflow run`` the run already exists, in the experiment ``mlflow run`` chose
    (``--experiment-name``, else *Default*); every run of the command goes there, so the
    logged ``experiment`` follows it. ``MLFLOW_EXPERIMENT_NAME`` is honoured the same way.
    An ``experiment=`` the user set that contradicts an existing ``mlflow run`` run is an
    error (the run cannot move).
    """
    from tracking.runs import active_experiment_name

    name = active_experiment_name()
    if name is None or name == cfg.run.experiment:
        return cfg
    if "experiment" in explicit:
        if launched_run_id() or launched_experiment_id():
            raise LangpruneError(
                f"experiment={cfg.run.experiment} but `mlflow run` filed this run in "
                f"experiment {name!r}; pass --experiment-name {cfg.run.experiment} to "
                "`mlflow run` instead")
        return cfg  # MLFLOW_EXPERIMENT_NAME is only a default
    return cfg.replace(experiment=name)


def _on_signal(signum: int, frame: Any) -> None:
    from tracking.runs import Interrupted

    raise Interrupted(f"received signal {signal.Signals(signum).name}")


def _cmd_main(cfg: Config) -> None:
    from jobs.console import summarise_run
    from jobs.main import run_main

    summarise_run(cfg, run_main(cfg).run_id)


def _cmd_dense(cfg: Config) -> None:
    from jobs.console import summarise_run
    from jobs.main import preflight, run_dense

    _, probe = preflight(cfg)
    summarise_run(cfg, run_dense(cfg, probe=probe)[0], dense=True)


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


def _cmd_check(cfg: Config) -> None:
    from tracking.runs import check_tracking_reachable, experiment_id, tracking_uri

    check_tracking_reachable()
    exp = experiment_id(cfg.run.experiment)  # created now, with its artifact location
    print(f"ok: tracking store {tracking_uri()} answers; experiment {cfg.run.experiment!r} "
          f"(id {exp})")


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
    "check": _cmd_check,
}


def _fail_env_run(command: str, message: str) -> None:
    """Give the run ``mlflow run`` created, when we never took it over, our name and
    reason (best effort; see :func:`tracking.runs.fail_env_run`)."""
    if not launched_run_id():  # none, or taken over: spare the import of mlflow
        return
    from tracking.runs import fail_env_run

    fail_env_run(command, message)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from jobs.console import configure_logging, verbose_requested

    configure_logging(verbose_requested(args.verbose))
    keep_freed_memory()  # before any tensor work (pipeline.host_memory: why, and how to opt out)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    apply_http_retry_defaults()  # ride out a tracking server restart (README "Reliability")
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        cfg = build_config(args.config, args.overrides, args.command)
        check_command(args.command, cfg)
        if args.command in TRACKED_COMMANDS:
            cfg = adopt_experiment(cfg, explicit_keys(args.config, args.overrides))
        HANDLERS[args.command](cfg)
    except LangpruneError as e:
        print(f"error: {e}", file=sys.stderr)
        _fail_env_run(args.command, str(e))
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
