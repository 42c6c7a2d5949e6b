"""Fault injection for the hardening tests, off unless ``CIFARLAB_FAULT`` is set.

``CIFARLAB_FAULT=<point>:<n>[:<signal>]`` sends this process ``signal`` (default ``KILL``; ``INT`` for Ctrl-C)
the ``n``-th time it passes ``point``: ``step`` (end of a training step), ``epoch`` (a trial's epoch stored),
``promoted`` (an epoch of a trial above the lowest rung stored, after ``epoch``), ``store`` (a trial's attributes
stored, its value not yet), ``report`` (while the pages are written)."""

from __future__ import annotations

import os
import signal

_passes: dict[str, int] = {}


def reset() -> None:
    """Count every point's passes from zero again: a process that injects faults more than once (a test worker
    running several tests) calls it before each."""
    _passes.clear()


def point(name: str) -> None:
    spec = os.environ.get("CIFARLAB_FAULT")
    if not spec:
        return
    where, _, rest = spec.partition(":")
    if where != name:
        return
    count, _, sig = rest.partition(":")
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] == int(count or 1):
        os.kill(os.getpid(), getattr(signal, f"SIG{sig or 'KILL'}"))
