"""Keep freed host memory in the process, so that a CPU training step does not page-fault its way through it.

glibc's malloc serves blocks above 32 MiB with a fresh ``mmap`` and unmaps them on ``free``, so every step at
batch 512 met gigabytes of new zero-filled pages. ``retain_freed_memory(True)`` serves every block from the heap
and keeps it there; ``False`` restores what a default process settles into. Other C libraries are left alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
from collections.abc import Iterator

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
KEPT_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int
DEFAULT_MMAP_MAX = 65536  # glibc's default
SETTLED_MMAP_THRESHOLD = 32 << 20  # glibc's dynamic mmap threshold, at its cap, once large blocks were freed

_retained = False


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only (musl has a mallopt that does nothing)
        return libc
    except (OSError, AttributeError):
        return None


def retain_freed_memory(retain: bool = True) -> bool:
    """Keep (True) or return (False) freed memory, as the module says; whether this C library took it."""
    global _retained
    libc = _glibc()
    if libc is None:
        return False
    if retain:
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, KEPT_TRIM_THRESHOLD) == 1
    else:
        ok = (libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX) == 1
              and libc.mallopt(M_MMAP_THRESHOLD, SETTLED_MMAP_THRESHOLD) == 1
              and libc.mallopt(M_TRIM_THRESHOLD, 2 * SETTLED_MMAP_THRESHOLD) == 1)
        libc.malloc_trim(0)
    if ok:
        _retained = retain
    return ok


def freed_memory_retained() -> bool:
    """Whether ``retain_freed_memory(True)`` is in force."""
    return _retained


@contextlib.contextmanager
def retained_memory(retain: bool = True) -> Iterator[bool]:
    """``retain_freed_memory(retain)`` for a block, then the state before it; yields whether it took effect."""
    before = _retained
    took = retain_freed_memory(retain) if retain != before else _glibc() is not None
    try:
        yield took
    finally:
        if _retained != before:
            retain_freed_memory(before)
