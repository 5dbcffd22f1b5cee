"""What the analyses need to know of a pruned run: its keys (and params), as protocols.

:class:`tracking.runs_table.Member` satisfies both, so analysis/ needs no tracking code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


class RunKeys(Protocol):
    """What identifies a pruned run of a sweep."""

    @property
    def run_id(self) -> str: ...
    @property
    def method(self) -> str: ...
    @property
    def calib_lang(self) -> str: ...
    @property
    def calib_set(self) -> int: ...


class SweepRun(RunKeys, Protocol):
    """A pruned run with its params (strings, e.g. ``sparsity``)."""

    @property
    def params(self) -> Mapping[str, str]: ...
