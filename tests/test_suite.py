"""The suite's own set-up: under pytest-xdist each worker takes its share of the cores, not all of them, and the
longest test files are handed out first."""

import os

import pytest
import torch


def test_xdist_workers_share_the_cores():
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        pytest.skip("not run under pytest-xdist (-n 0 or -p no:xdist): torch keeps its default threads")
    share = max(1, (os.cpu_count() or 1) // int(workers))
    assert torch.get_num_threads() == share
    assert os.environ["OMP_NUM_THREADS"] == str(share)  # what the studies and benchmarks the tests start inherit


def test_the_longest_files_are_handed_out_first(request):
    # conftest.FILE_COST orders the files for pytest-xdist; a renamed or deleted file would drop out of it silently
    from conftest import FILE_COST

    here = os.path.dirname(__file__)
    assert [name for name in FILE_COST if not os.path.isfile(os.path.join(here, name))] == []
    files = list(dict.fromkeys(item.path.name for item in request.session.items))
    ranked = [name for name in files if name in FILE_COST]
    assert ranked == sorted(ranked, key=lambda name: -FILE_COST[name])
    assert files[:len(ranked)] == ranked  # the named files before any other
