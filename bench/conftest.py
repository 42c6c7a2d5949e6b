"""Micro-benchmarks (pytest-benchmark): ``nox -s bench`` runs them and keeps the JSON under .benchmarks/,
so two commits compare with ``pytest-benchmark compare``."""

import pytest


@pytest.fixture(scope="session")
def splits():
    import os

    from cifarlab.data import load_splits

    return load_splits(os.environ.get("CIFARLAB_DATA") or "synthetic:4096:512", val_size=1024)
