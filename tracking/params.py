"""Config -> MLflow params and tags: one canonical serializer, a config hash, the code version."""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shlex
import socket
import subprocess
from dataclasses import fields
from importlib import metadata

from pipeline.config import DENSE, RUN_SECTIONS, Config, EvalCfg, format_blend, tagged
from pipeline.errors import LangpruneError
from pipeline.paths import REPO_ROOT
from tracking.reliability import TAG_HTTP_RETRIES, http_retry_tag

# Tag keys written by langprune (the UI shows them; searches use them).
TAG_KIND = "langprune.kind"  # pruned | dense | sweep | search | trial | verdict
TAG_STATE = "langprune.state"  # running | complete | reused | failed | killed
TAG_HASH = "langprune.config_hash"
TAG_CODE = "langprune.code_version"
TAG_COMMIT = "langprune.git_commit"
TAG_DIRTY = "langprune.git_dirty"
TAG_PID = "langprune.pid"
TAG_HOST = "langprune.host"
TAG_DEVICE = "langprune.device"
TAG_SPARSEGPT_FACTOR = "langprune.sparsegpt_factor"  # products (CPU) or lapack
TAG_REUSED = "langprune.reused_run"
TAG_DENSE = "langprune.dense_run"
TAG_ENTRY = "langprune.entry_point"
TAG_BUDGET = "langprune.eval_budget"  # e.g. t2048-l8: a column that tells budgets apart
TAG_ERROR = "langprune.error"  # the one-line reason of a failed run

# What the code version covers: a change here makes finished runs stale.
CODE_PATHS = ("pipeline", "analysis", "tracking", "jobs", "MLproject", "pyproject.toml")
VERSIONED = ("torch", "transformers", "lm_eval", "mlflow", "datasets", "optuna")


def to_mlflow_params(cfg: Config, sections: tuple[str, ...] = RUN_SECTIONS) -> dict[str, str]:
    """The canonical flat config of ``sections`` as MLflow params (strings, sorted keys).

    Keys are the config keys with their canonical values, exactly as the user set them (so
    they agree with the params ``mlflow run`` logs for the same keys). Two derived params make
    blends comparable: ``blend``, the resolved canonical blend (``zh:1.0`` for
    ``calib_lang=zh``; ``calib_blend`` overrides ``calib_lang``), and ``calib``, its short label.
    """
    flat = cfg.to_flat(sections)
    if "calib" in sections:
        flat["blend"] = format_blend(cfg.calib.blend)
        flat["calib"] = cfg.calib.blend_label
    return dict(sorted(flat.items()))


def same_param_value(key: str, logged: str, ours: str) -> bool:
    """Whether an already logged param means the same as ours.

    ``mlflow run`` logs entry-point params itself, shell-quoted (``''`` for an empty value)
    and spelled as the user typed them (``0.50``); those are the same value as our canonical
    ``''``/``0.5`` once unquoted and parsed with the config's own coercion.
    """
    if logged == ours:
        return True
    try:
        parts = shlex.split(logged)
        unquoted = parts[0] if len(parts) == 1 else logged
        if key in Config.keys():
            return Config.from_overrides({key: unquoted}).to_flat()[key] == ours
        return unquoted == ours
    except (ValueError, LangpruneError):
        return False


def dense_identity(cfg: Config) -> dict[str, str]:
    """What a dense baseline depends on: the model and the evaluation, not pruning/calibration
    (the config fields tagged ``DENSE``)."""
    keep = set(tagged(DENSE))
    return {k: v for k, v in cfg.identity().items() if k in keep}


def dense_hash(cfg: Config) -> str:
    blob = repr(sorted(dense_identity(cfg).items())).encode()
    return "dense-" + hashlib.sha256(blob).hexdigest()[:16]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


@functools.lru_cache(maxsize=1)
def code_version() -> tuple[str, bool, str]:
    """``(commit, dirty, code_version)``.

    The code version is the commit, plus a hash of the uncommitted diff when the tree is
    dirty, so that a run is reused only by exactly the same code. Outside a git checkout it is
    the installed package version.
    """
    commit = (_git("rev-parse", "HEAD") or "").strip()
    if not commit:
        version = "pkg-" + metadata.version("langprune")
        return "unknown", False, version
    status = _git("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS) or ""
    dirty = bool(status.strip())
    if not dirty:
        return commit, False, commit
    diff = _git("diff", "HEAD", "--", *CODE_PATHS) or ""
    return commit, True, f"{commit}+dirty.{hashlib.sha256(diff.encode()).hexdigest()[:10]}"


def versions() -> dict[str, str]:
    out = {}
    for name in VERSIONED:
        dist = name.replace("_", "-")
        try:
            out[f"version.{name}"] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[f"version.{name}"] = "absent"
    out["version.python"] = platform.python_version()
    return out


def run_tags(cfg: Config, kind: str, device: str, entry_point: str) -> dict[str, str]:
    """Tags every langprune run carries (code version, config hash, versions, device, pid)."""
    commit, dirty, code = code_version()
    tags = {
        TAG_KIND: kind,
        TAG_STATE: "running",
        TAG_HASH: dense_hash(cfg) if kind == "dense" else cfg.config_hash(),
        TAG_CODE: code,
        TAG_COMMIT: commit,
        TAG_DIRTY: "true" if dirty else "false",
        TAG_PID: str(os.getpid()),
        TAG_HOST: socket.gethostname(),
        TAG_DEVICE: device,
        TAG_ENTRY: entry_point,
        TAG_HTTP_RETRIES: http_retry_tag(),  # how long this run waits out a lost server
        TAG_BUDGET: eval_budget(cfg),
        "mlflow.source.git.commit": commit,
    }
    tags.update(versions())
    return tags


# The evaluation budget a run name spells out when it differs from these (EvalCfg's
# defaults): key -> letter, e.g. eval_tokens=1024 limit=4 -> "t1024-l4".
_BUDGET_LETTERS = {"eval_tokens": "t", "limit": "l"}


def eval_budget(cfg: Config) -> str:
    """The evaluation budget as a short label, always complete: ``t2048-l8``."""
    return "-".join(f"{c}{getattr(cfg.eval, k)}" for k, c in _BUDGET_LETTERS.items())


def _budget_suffix(cfg: Config) -> str:
    """``-t1024-l4`` for the budget keys that differ from EvalCfg's defaults, else ``''``."""
    defaults = {f.name: f.default for f in fields(EvalCfg)}
    parts = [f"{c}{getattr(cfg.eval, k)}" for k, c in _BUDGET_LETTERS.items()
             if getattr(cfg.eval, k) != defaults[k]]
    return "".join(f"-{p}" for p in parts)


def run_name(cfg: Config, kind: str = "pruned") -> str:
    """Readable run names, e.g. ``wanda-0.5-zh-set0`` or ``dense-gemma-3-270m``.

    A dense baseline exists once per evaluation budget, so its name carries the budget
    when it is not the default (``dense-gemma-3-270m-t1024-l4`` for the sweep's); every
    run also has the tag :data:`TAG_BUDGET` for a runs-table column.
    """
    if cfg.run.run_name:
        return cfg.run.run_name
    model = cfg.model.model.rstrip("/").split("/")[-1]
    if kind == "dense":
        return f"dense-{model}{_budget_suffix(cfg)}"
    p = cfg.prune
    amount = p.pattern if p.pattern != "unstructured" else f"{p.sparsity:g}"
    blend = cfg.calib.blend
    label = next(iter(blend)) if len(blend) == 1 else "+".join(
        f"{k}{w:.2g}" for k, w in blend.items()
    )
    return f"{p.method}-{amount}-{label}-set{cfg.calib.calib_set}"
