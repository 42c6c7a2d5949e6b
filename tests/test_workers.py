"""Worker processes and devices: each worker's GPU from the mask the user set, several workers per GPU, and an
out-of-memory trial that fails with its reason and comes back once at a smaller batch."""

from __future__ import annotations

import pytest
from conftest import load_study_at as load

from studies import _workers, onecycle


@pytest.mark.parametrize(("workers", "per_gpu", "gpus", "mask", "expected"), [
    (3, None, 0, None, [None, None, None]),  # no GPU: the environment as it is
    (2, None, 2, None, ["0", "1"]),
    (2, None, 2, "2,3", ["2", "3"]),  # the user's mask, never renumbered to 0 and 1
    (3, None, 2, "2,3", ["2", "3", "2"]),  # more workers than GPUs: in turn
    (1, 2, 2, "2,3", ["2", "3", "2", "3"]),  # two per GPU
    (1, 3, 1, "GPU-5f1e", ["GPU-5f1e"] * 3),  # a UUID mask, three workers on its one GPU
    (1, 2, 1, "1,4", ["1", "1"]),  # torch sees one of the two (the other taken): only that one
])
def test_each_worker_sees_one_device_of_the_users_mask(workers, per_gpu, gpus, mask, expected):
    assert _workers.worker_devices(workers, per_gpu, gpus, mask) == expected


def test_workers_per_gpu_without_a_gpu_is_refused(tmp_path, capsys):
    argv = ["--data", "synthetic:200:40", "--budget", "smoke", "--trials", "1", "--workers-per-gpu", "2",
            "--seed-max-lr", "0.003", "--device", "cpu", "--quiet", "--no-report", "--out", str(tmp_path)]
    assert onecycle.main(argv) == 2
    err = capsys.readouterr().err
    assert "--workers-per-gpu needs a CUDA device" in err and len(err.strip().splitlines()) <= 2


def test_an_out_of_memory_trial_fails_with_its_reason_and_comes_back_once_at_a_smaller_batch(tmp_path, monkeypatch):
    import cifarlab.train

    real = cifarlab.train.fit

    def fit(config, *args, **kw):
        # cuDNN's allocation failure is a plain RuntimeError, not torch's OutOfMemoryError
        if config.batch_size >= 512:
            raise RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED\n(while building the conv plan)")
        return real(config, *args, **kw)

    monkeypatch.setattr(cifarlab.train, "fit", fit)
    argv = ["--data", "synthetic:200:40", "--budget", "smoke", "--trials", "2", "--arch", "custom_resnet",
            "--rungs", "1", "--seed-max-lr", "0.003", "--quiet", "--no-report", "--out", str(tmp_path)]
    assert onecycle.main(argv) == 0
    trials = load(tmp_path).trials
    seed, retry = trials[0], trials[1]  # the seed's batch 512 runs out; its retry runs next
    assert seed.state.name == "FAIL" and seed.params["batch_size"] == 512
    assert seed.user_attrs["fail_reason"] == "out of memory at batch size 512: cuDNN error: CUDNN_STATUS_ALLOC_FAILED"
    assert retry.state.name == "COMPLETE" and retry.user_attrs["oom_retry_of"] == 0
    assert retry.params == {**seed.params, "batch_size": 256} and not retry.user_attrs.get("seed_config")
    # every other trial that ran out came back once, at the next smaller batch, and a retry never again
    for t in trials:
        again = [r for r in trials if r.user_attrs.get("oom_retry_of") == t.number]
        if t.state.name == "FAIL" and t.user_attrs.get("oom_retry_of") is None:
            assert [r.params["batch_size"] for r in again] == [t.params["batch_size"] // 2]
        else:
            assert again == []
    assert sum(t.state.name == "COMPLETE" for t in trials) == 2
    assert all(t.user_attrs["overhead_seconds"] >= 0 for t in trials if t.state.name == "COMPLETE")


def test_an_error_that_is_not_out_of_memory_still_stops_the_study(tmp_path, monkeypatch):
    import cifarlab.train

    def fit(config, *args, **kw):
        raise RuntimeError("expected scalar type Float but found Half")

    monkeypatch.setattr(cifarlab.train, "fit", fit)
    argv = ["--data", "synthetic:200:40", "--budget", "smoke", "--trials", "1", "--arch", "custom_resnet",
            "--seed-max-lr", "0.003", "--quiet", "--no-report", "--out", str(tmp_path)]
    with pytest.raises(RuntimeError, match="expected scalar type"):
        onecycle.main(argv)


@pytest.mark.parametrize(("busy", "peak_gib", "total_gib", "k", "bound"), [
    (0.30, 6, 80, 3, "idle time"),  # a third busy: three fill it
    (0.10, 30, 80, 2, "memory"),  # idle enough for ten, room for two
    (0.05, 1, 80, 4, "cap of 4"),
    (0.90, 2, 80, 1, "idle time"),  # one already fills it
    (0.40, 90, 80, 1, "memory"),  # not even one fits 80%: still one, the trial's own OOM rule handles the rest
    (float("nan"), 80, 80, 1, "memory"),  # the seed's batch itself ran out of memory alone
])
def test_auto_workers_per_gpu_fills_the_idle_time_within_memory(busy, peak_gib, total_gib, k, bound):
    chosen, why = _workers.choose_workers_per_gpu(busy, peak_gib * 2**30, total_gib * 2**30, 512, 1024)
    assert chosen == k and bound in why and f"{k} per GPU" in why
    assert (f"busy {busy:.0%}" if busy == busy else "one worker ran out of memory at batch 512") in why


def test_workers_per_gpu_auto_without_a_gpu_is_refused(tmp_path, capsys):
    argv = ["--data", "synthetic:200:40", "--budget", "smoke", "--trials", "1", "--workers-per-gpu", "auto",
            "--seed-max-lr", "0.003", "--device", "cpu", "--quiet", "--no-report", "--out", str(tmp_path)]
    assert onecycle.main(argv) == 2
    assert "--workers-per-gpu needs a CUDA device" in capsys.readouterr().err


def _raise_config_error(message):
    from cifarlab.errors import ConfigError

    raise ConfigError(message)


def test_work_in_a_child_process_returns_its_value_and_its_errors():
    import os

    from cifarlab.errors import ConfigError

    assert _workers.in_child(os.getpid) != os.getpid()
    with pytest.raises(ConfigError, match="pass --seed-max-lr"):
        _workers.in_child(_raise_config_error, "the LR range test failed; pass --seed-max-lr")


@pytest.mark.cuda
def test_auto_workers_per_gpu_and_the_range_test_leave_no_cuda_context_in_the_parent(tmp_path):
    import subprocess
    import sys

    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    argv = ["--data", "synthetic:2000:40", "--budget", "smoke", "--trials", "2", "--arch", "custom_resnet",
            "--rungs", "1", "--workers-per-gpu", "auto", "--device", "cuda", "--no-report", "--out", str(tmp_path)]
    # A fresh process: this one may have used CUDA in other tests.
    code = ("import sys, torch; from studies import onecycle; rc = onecycle.main(sys.argv[1:]); "
            "print('cuda initialised in the parent:', torch.cuda.is_initialized()); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--workers-per-gpu auto: one worker kept the GPU busy" in done.stdout
    assert "cuda initialised in the parent: False" in done.stdout  # range test in a child, trials in workers
    assert list((tmp_path / "lrfind").glob("*/lrfind.json"))


def test_a_worker_builds_a_subsets_data_once_and_reuses_it_in_later_trials(tmp_path):
    argv = ["--data", "synthetic:300:40", "--budget", "smoke", "--trials", "3", "--arch", "custom_resnet",
            "--rungs", "2", "--seed-max-lr", "0.003", "--quiet", "--no-report", "--out", str(tmp_path)]
    assert onecycle.main(argv) == 0
    trials = [t for t in load(tmp_path).trials if t.state.name == "COMPLETE"]
    built = {rung: [t.user_attrs["kept_built"] for t in trials if t.user_attrs["rung"] == rung] for rung in (0, 1)}
    # each rung's first trial builds its subset, statistics, whitening basis and device copies; the rest reuse them
    assert built[0][0] >= 5 and built[0][1:] == [0, 0]
    assert built[1] == [built[0][0] - 2]  # the validation images and labels were kept from rung 0
    assert all(t.user_attrs["overhead_seconds"] >= 0 for t in trials)


def test_the_auto_profile_runs_the_top_rungs_steps_at_the_seeds_and_the_largest_batch(monkeypatch):
    # On the CPU the steps run as on a GPU (the busy share and memory are a GPU's, so they read NaN and 0 here);
    # small batches stand in for the search space's 512 and 1,024.
    import argparse

    from cifarlab.data import load_splits
    from studies._ladder import Budget, make_ladder

    monkeypatch.setattr(_workers, "SEED_CONFIG", {"batch_size": 16})
    monkeypatch.setattr(_workers, "BATCH_SIZES", (16, 32))
    splits = load_splits("synthetic:300:40", val_size=64, seed=0)
    budget = Budget("smoke", tuple(make_ladder(1, 200, 1, 3.0)), 3.0, 64, 8)
    args = argparse.Namespace(device="cpu", precision="auto", compile=False, compile_mode="default", seed=0)
    profile = _workers.profile_one_worker("custom_resnet", splits, budget, args, steps=2)
    assert (profile["batch_size"], profile["largest_batch"]) == (16, 32)
    assert profile["busy_share"] != profile["busy_share"] and profile["peak_bytes"] == 0
