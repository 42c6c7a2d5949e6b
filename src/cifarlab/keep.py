"""What a process keeps between training runs: a study worker trains trial after trial on the same few subsets, so
their arrays, normalisation, whitening basis and device copies, and its compiled models (one per shape), are built
once per worker instead of once per trial.

``memo(what, key, make)`` returns the kept value for ``key`` or makes it. Inside ``keeping(cache)`` values live as
long as the cache; outside it a run keeps them for itself (``fit`` opens one), so a lone run gains the same."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
_PLAIN = (str, int, float, bool, type(None))


class Kept:
    """The values one process keeps, and how often each kind was built and reused (``built``, ``reused``)."""

    def __init__(self) -> None:
        # A key names arrays and models by identity; the entry holds them, so that an id is never reused for another.
        self.entries: dict[tuple, tuple[tuple, object]] = {}
        self.built: Counter[str] = Counter()
        self.reused: Counter[str] = Counter()

    def get(self, what: str, key: tuple, make: Callable[[], T]) -> T:
        ident = (what, *(_ident(k) for k in key))
        if ident in self.entries:
            self.reused[what] += 1
            return self.entries[ident][1]  # type: ignore[return-value]
        value = make()
        self.entries[ident] = (key, value)
        self.built[what] += 1
        return value


def _ident(k: object) -> object:
    if isinstance(k, tuple):
        return tuple(_ident(v) for v in k)
    return k if isinstance(k, _PLAIN) else (type(k).__name__, id(k))


_current: Kept | None = None


@contextlib.contextmanager
def keeping(cache: Kept | None = None) -> Iterator[Kept]:
    """Keep values in ``cache`` (a new one if None) while the block runs; an enclosing cache, if any, stays in use."""
    global _current
    if _current is not None:
        yield _current
        return
    _current = cache if cache is not None else Kept()
    try:
        yield _current
    finally:
        _current = None


def memo(what: str, key: tuple, make: Callable[[], T]) -> T:
    """The kept ``what`` for ``key`` (plain values by value, anything else by identity), else ``make()``."""
    return make() if _current is None else _current.get(what, key, make)
