"""What a job prints when it ends: a compact result table and how to open the run.

Plain text (``pandas.DataFrame.to_string``), not ``rich``: the same lines read the same in a
terminal, in ``mlflow run``'s captured output, in CI logs and in files, with no colour codes
to strip and no dependency on the terminal's width detection.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from collections.abc import Mapping, Sequence

from analysis.scores import render_summary, summary_table
from pipeline.config import Config
from tracking import runs as R

#: Third-party messages that tell the user nothing, dropped at their logger (everything
#: else those loggers say is kept). Each is expected by design here:
QUIET_MESSAGES: dict[str, tuple[str, ...]] = {
    # lm-eval warns whenever a model object (ours: the pruned model in memory) is passed
    # instead of a name, which is the documented way to evaluate an in-memory model.
    "lm_eval.models.huggingface": (
        "`pretrained` model kwarg is not of type `str`",
        "Passed an already-initialized model through `pretrained`",
    ),
    # num_fewshot is a config field, set on purpose and logged as a param.
    "lm_eval.evaluator": ("Overwriting default num_fewshot",),
}
#: Loggers whose INFO lines are bookkeeping (task lists, seeds, system-metrics start/stop,
#: database migrations): shown with --verbose only; their warnings always.
CHATTY = ("lm_eval", "mlflow", "mlflow.system_metrics", "mlflow.store", "alembic")


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: Sequence[str]) -> None:
        super().__init__()
        self._prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self._prefixes)


def verbose_requested(flag: bool = False) -> bool:
    """``--verbose`` or ``LANGPRUNE_LOG=debug`` shows every log line of every library."""
    return flag or os.environ.get("LANGPRUNE_LOG", "").lower() == "debug"


def configure_logging(verbose: bool = False) -> None:
    """Short stage lines (``HH:MM:SS message``) for langprune; third-party noise filtered.

    With ``verbose`` nothing is filtered and every logger speaks at DEBUG, with its name.
    """
    if verbose:
        logging.basicConfig(level=logging.DEBUG,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        for name in CHATTY:
            logging.getLogger(name).setLevel(logging.NOTSET)
        for name in QUIET_MESSAGES:
            logger = logging.getLogger(name)
            for f in [f for f in logger.filters if isinstance(f, _DropMessages)]:
                logger.removeFilter(f)
        return
    level = os.environ.get("LANGPRUNE_LOG_LEVEL", "INFO")
    # No force: a host that configured logging already (a notebook, pytest) keeps its own.
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name, prefixes in QUIET_MESSAGES.items():
        logging.getLogger(name).addFilter(_DropMessages(prefixes))
    try:  # one progress bar at a time: transformers' weight-loading bars are not ours
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def ui_command() -> str:
    """The command that opens this job's tracking store in the MLflow UI."""
    uri = R.tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)}"


def print_summary(title: str, metrics: Mapping[str, float], langs: Sequence[str],
                  tasks: Sequence[str], dense: Mapping[str, float] | None = None,
                  run_id: str = "") -> None:
    """Print the per-language table of one run (stdout), then the run id and the UI command.

    Task cells read ``0.53 [0.46, 0.60]`` (accuracy, Wilson 95% interval); a trailing ``*``
    marks a task whose interval includes its chance level (uninformative for this model).
    """
    table = summary_table(metrics, list(langs), list(tasks), dense)
    lines = [f"\n{title}", render_summary(table)]
    if any(str(v).endswith("*") for v in table.drop(columns="lang").to_numpy().ravel()):
        lines.append("* interval includes chance: uninformative for this model")
    if run_id:
        lines.append(f"run {run_id}; to look at it: {ui_command()}")
    print("\n".join(lines), file=sys.stdout, flush=True)


def print_sweep_summary(parent_id: str, dense_id: str, members: Sequence[Mapping[str, str]]
                        ) -> None:
    """The sweep's cells (run, row, status) and the commands that compare them.

    No scores here: comparing cells needs the paired intervals the report computes.
    """
    import pandas as pd

    table = pd.DataFrame([{"method": m.get("method", ""), "sparsity": m.get("sparsity", ""),
                           "row": m.get("row", m.get("calib_lang", "")),
                           "set": m.get("calib_set", ""), "run": m.get("run_id", "") or "-",
                           "status": "reused" if m.get("reused") == "true" else
                           m.get("status", "")} for m in members])
    lines = [f"\nsweep {parent_id}: {len(members)} cells, dense baseline {dense_id}",
             table.to_string(index=False) if len(table) else "(no cells)",
             f"compare them (paired intervals): python -m pipeline analyze sweep_run={parent_id}"
             f" && python -m pipeline report sweep_run={parent_id}",
             f"to look at them: {ui_command()}"]
    print("\n".join(lines), file=sys.stdout, flush=True)


def summarise_run(cfg: Config, run_id: str, dense: bool = False) -> None:
    """:func:`print_summary` of a finished (or reused) run, read back from the store; a
    pruned run is shown against its dense baseline (tag ``langprune.dense_run``)."""
    from tracking import params as P

    run = R.client().get_run(run_id)
    metrics = dict(run.data.metrics)
    dense_id = run.data.tags.get(P.TAG_DENSE, "")
    dense_metrics = dict(R.client().get_run(dense_id).data.metrics) if dense_id else None
    tasks = [t for t in cfg.eval.task_list
             if any(k.startswith(f"{t}.") for k in metrics)]
    what = "dense" if dense else f"{cfg.prune.method} {cfg.prune.sparsity:g}, calibrated on " \
        f"{cfg.calib.row_label}"
    print_summary(f"{P.run_name(cfg, 'dense' if dense else 'pruned')} ({what}): perplexity "
                  "and task accuracy per evaluation language, 95% intervals",
                  metrics, cfg.eval.eval_lang_list, tasks,
                  None if dense else dense_metrics, run_id)
