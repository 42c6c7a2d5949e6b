"""Shared fixtures. Tests that need the real CIFAR-10 read it from $CIFARLAB_DATA: skipped when the variable is
unset, failed when it is set and the data is missing (CI sets it)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest


def pytest_configure(config):
    """Under pytest-xdist (-n), each worker gets its share of the cores, as studies.onecycle --workers gives its
    workers. Subprocesses that the tests start (studies, benchmarks) inherit it through OMP_NUM_THREADS."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        from cifarlab.timing import threads_per_worker

        threads = threads_per_worker(int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


# Seconds of test work per file in CI (2 cores, 2026-11-27; test_faults.py with its PostgreSQL test), longest
# first. pytest-xdist's --dist loadfile hands out files in collection order (pyproject turns its own by-test-count
# order off) and gives a worker its next file while it still runs the last tests of one, so a long file handed
# out last ran alone for minutes at the end; longest first, the last files are short. Files not named here run
# after these, in the usual order.
FILE_COST = {"test_faults.py": 250, "test_train.py": 210, "test_onecycle.py": 150, "test_bench.py": 85,
             "test_hardening.py": 80, "test_cli.py": 70, "test_reports.py": 68, "test_micro_bench.py": 40,
             "test_whitening.py": 35, "test_choices.py": 32, "test_ladder.py": 45, "test_workers.py": 15,
             "test_lr_finder.py": 14, "test_layers.py": 12}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -FILE_COST.get(item.path.name, 0))  # stable: a file's own order is kept


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Decoded-array cache in a temp folder of this test session, shared by its xdist workers (entries are
    written atomically, and a cold entry decoded by one load while the others wait): tests never touch the user's
    cache, and the real CIFAR-10 is decoded once a session."""
    old = os.environ.get("CIFARLAB_CACHE")
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, above each worker's own
    cache = base / "cifarlab-cache"
    cache.mkdir(exist_ok=True)
    os.environ["CIFARLAB_CACHE"] = str(cache)
    yield
    if old is None:
        os.environ.pop("CIFARLAB_CACHE", None)
    else:
        os.environ["CIFARLAB_CACHE"] = old


@pytest.fixture(autouse=True)
def _isolated_choices(tmp_path_factory, monkeypatch):
    """Each test starts with no stored speed choice (bench.devices --choose): one test's choice never leaks."""
    monkeypatch.setenv("CIFARLAB_CHOICES", str(tmp_path_factory.mktemp("choices") / "choices.json"))


@pytest.fixture(scope="session")
def real_data_path() -> Path:
    value = os.environ.get("CIFARLAB_DATA")
    if not value:
        pytest.skip("CIFARLAB_DATA is not set; set it to a CIFAR-10 ImageFolder copy to run real-data tests")
    path = Path(value)
    if not (path / "train").is_dir() or not (path / "test").is_dir():
        pytest.fail(f"CIFARLAB_DATA={value} is set but holds no train/ and test/ folders")
    return path


@pytest.fixture(scope="session")
def real_splits(real_data_path):
    from cifarlab.data import load_splits

    return load_splits(real_data_path, val_size=5000, seed=0)


@pytest.fixture
def postgres_url() -> tuple[str, str]:
    """(URL, password) of the PostgreSQL server that .ci/run starts on loopback; skipped where none is set."""
    url = os.environ.get("CIFARLAB_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("CIFARLAB_TEST_POSTGRES_URL is not set (.ci/run starts a PostgreSQL server and sets it)")
    return url, url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]


def denormalize(x, norm):
    """Normalised training images back to uint8 pixels, to compare them with their sources."""
    import torch

    mean = torch.tensor(norm.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(norm.std).view(1, 3, 1, 1) * 255
    return (x.float() * std + mean).round().clamp(0, 255).to(torch.uint8)


def write_image_folder(root: Path, classes_train, classes_test=None, per_class: int = 6, size: int = 32,
                       ext: str = ".png", seed: int = 0) -> Path:
    """A small ImageFolder tree with train/ and test/ of random images; returns ``root``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, classes in (("train", classes_train), ("test", classes_test or classes_train)):
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(folder / f"{i:04d}{ext}")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "tiny", ["cat", "dog", "frog"])


# The study command the hardening and fault tests run: a synthetic set, the smoke budget, one step a trial.
REPO = Path(__file__).resolve().parents[1]
STUDY = ["--data", "synthetic:400:60", "--val-size", "60", "--budget", "smoke", "--seed-max-lr", "0.003",
         "--precision", "auto", "--quiet"]
TINY = ["--train-subset", "32", "--val-size", "16"]  # one step a trial: these tests are about storage


def load_study_at(out: Path, arch: str = "custom_resnet", url: str | None = None):
    """``arch``'s study of the default name, in ``url`` or else ``out``'s default SQLite storage."""
    import optuna

    storage = url or f"sqlite:///{out / 'studies' / 'studies.db'}"
    return optuna.load_study(study_name=f"onecycle-{arch}", storage=storage)


@pytest.fixture(autouse=True)
def _malloc_setting_is_left_as_found():
    """cifarlab.cpu's freed-memory setting is process-wide: a test (or the code under it) that changes it and does
    not put it back would change what later tests in the same worker measure."""
    from cifarlab import cpu

    before = cpu.freed_memory_retained()
    yield
    assert cpu.freed_memory_retained() == before, "glibc's malloc setting was left changed"


@pytest.fixture(autouse=True)
def _fault_counts_start_at_zero():
    """cifarlab.faults counts passes per point for the life of the process (one run in real use): each test that
    sets CIFARLAB_FAULT in this process must count from zero, not from where an earlier test in the worker left."""
    from cifarlab import faults

    faults.reset()
    yield
