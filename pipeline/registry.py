"""One small generic name -> object registry with "did you mean" errors (after lm-eval)."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Generic, TypeVar

from pipeline.errors import LangpruneError

T = TypeVar("T")


# Similarity (difflib ratio) a known name needs to be suggested. Typos score 0.8-0.95
# ("sparsty"/"sparsity", "sib2000"/"sib200"); below 0.75 the matches among lm-eval's
# thousands of task names are unrelated ("nonexistent_task" -> "injongointent_tasks", 0.74).
SUGGEST_CUTOFF = 0.75


def suggest(name: str, known: list[str], n: int = 3) -> str:
    """Return a ``did you mean`` clause for ``name`` among ``known`` ('' if none is close)."""
    close = difflib.get_close_matches(name, known, n=n, cutoff=SUGGEST_CUTOFF)
    return f"; did you mean {', '.join(close)}?" if close else ""


class Registry(Generic[T]):
    """Maps names to objects. Registration is explicit: :meth:`add`."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, obj: T) -> None:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = sorted(self._items)
            raise LangpruneError(
                f"unknown {self.kind} {name!r}; known: {', '.join(known)}{suggest(name, known)}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
