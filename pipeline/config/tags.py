"""Config field tags: what each field's value feeds, declared once, on the field.

Every key list that depends on a tag (the config hash, the dense baseline's identity, a
study's fixed config, a trial's params) is derived from these tags by
:func:`pipeline.config.tagged`.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

# Field tags (declared once, on the fields; every key list is derived from them by tagged):
EXEC = "exec"  # how a run is executed, not what it computes: not in the config hash
DENSE = "dense"  # the dense baseline depends on it (its hash, dense_identity)
STUDY = "study"  # a blend search's trials depend on it (a resumed study must match)
STUDY_TASKS = "study_tasks"  # ... when the objective evaluates tasks
TRIAL = "trial"  # logged as a param of every search trial run


def _f(default: Any, *tags: str) -> Any:
    """A config field with its tags (see :data:`EXEC` etc.)."""
    return field(default=default, metadata={"tags": frozenset(tags)})
