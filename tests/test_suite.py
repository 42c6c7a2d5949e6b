"""The suite's own set-up: under pytest-xdist each worker takes its share of the cores, not all of them."""

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
