"""Worker processes of one study on this machine: how many per GPU (``--workers-per-gpu K|auto``), which device
each one sees, and work that must leave no CUDA context behind in the parent (``in_child``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from studies._study import BATCH_SIZES, SEED_CONFIG

MAX_WORKERS_PER_GPU = 4
MEMORY_SHARE = 0.8  # of the GPU's memory that K workers' peaks may fill together: the allocator needs slack


def in_child(fn, *args):
    """``fn(*args)`` in a fresh (spawned) process: a CUDA context, and the memory it holds, end with that process.
    ``fn``'s exceptions come back as they were raised."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def choose_workers_per_gpu(busy_share: float, peak_bytes: int, total_bytes: int, batch_size: int,
                           largest_batch: int) -> tuple[int, str]:
    """K for ``--workers-per-gpu auto``: as many workers as fill the GPU's idle time (one keeps it busy
    ``busy_share`` of its wall time), as many as fit its memory at the largest batch, at most 4; and why."""
    by_time = max(1, int(1 / max(busy_share, 1e-3))) if busy_share == busy_share else 1  # NaN: not measured
    by_memory = max(1, int(MEMORY_SHARE * total_bytes // max(peak_bytes, 1)))
    k = min(by_time, by_memory, MAX_WORKERS_PER_GPU)
    limit = (f"{MEMORY_SHARE:.0%} of its memory" if k == by_memory else "the GPU's idle time" if k == by_time
             else f"the cap of {MAX_WORKERS_PER_GPU}")
    gib = 2**30
    busy = (f"kept the GPU busy {busy_share:.0%} of its time" if busy_share == busy_share else
            "ran out of memory")
    return k, (f"one worker {busy} at batch {batch_size} and peaked at {peak_bytes / gib:.1f} of "
               f"{total_bytes / gib:.0f} GiB at batch {largest_batch}: {k} per GPU (bound by {limit})")


def profile_one_worker(arch: str, splits, budget, args, steps: int = 20) -> dict:
    """What ``choose_workers_per_gpu`` needs, timed by the benchmark's ``time_cases`` on the top rung's data in this
    (child) process: the busy share over ``steps`` profiled steps of the seed's batch, and the peak memory at the
    largest batch."""
    import torch

    from cifarlab.bench import Case, time_cases
    from cifarlab.breakdown import busy_share
    from cifarlab.choices import resolve_speed
    from cifarlab.timing import resolve_device
    from studies._trial import out_of_memory

    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"  # elsewhere (the tests) the steps run, and no memory is counted
    total = torch.cuda.get_device_properties(device).total_memory if on_gpu else 0
    speed = resolve_speed(arch, device, args.precision, "auto")
    data = splits.with_train_subset(budget.rungs[-1].train_images, seed=args.seed)
    measured = {}
    for batch in (SEED_CONFIG["batch_size"], BATCH_SIZES[-1]):
        case = Case(arch, str(device), batch, speed.precision, speed.channels_last, compile=args.compile,
                    compile_mode=args.compile_mode)
        try:
            [result] = time_cases([case], data, images=batch, repeats=1, eval_images=batch, profile_steps=steps)
            measured[batch] = (busy_share(result.breakdown), result.peak_memory_mb * 2**20 if on_gpu else 0)
        except RuntimeError as exc:
            if not (on_gpu and out_of_memory(exc)):
                raise
            measured[batch] = (float("nan"), total)  # one worker alone runs out: K is 1
    return {"busy_share": measured[SEED_CONFIG["batch_size"]][0], "peak_bytes": measured[BATCH_SIZES[-1]][1],
            "total_bytes": total, "batch_size": SEED_CONFIG["batch_size"], "largest_batch": BATCH_SIZES[-1]}


def worker_devices(workers: int, per_gpu: int | None, gpus: int, visible: str | None) -> list[str | None]:
    """Each worker's ``CUDA_VISIBLE_DEVICES``: one entry of the mask the command was given (``visible``; every
    device when unset), in turn, never renumbered (``2,3`` gives workers 2 and 3, not 0 and 1). ``per_gpu`` workers
    on each of the ``gpus`` visible, else ``workers`` spread over them; None (the environment as it is) without a
    GPU."""
    if not gpus:
        return [None] * workers
    mask = [d.strip() for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(gpus)]
    mask = mask[:gpus]
    return [mask[i % len(mask)] for i in range(per_gpu * len(mask) if per_gpu else workers)]


def spawn_workers(args, worker_argv, raw_argv, arch, splits, budget, console, deadline: float | None = None) -> None:
    """K processes on this machine, one study; with GPUs each worker sees only its own."""
    import torch

    from cifarlab.errors import ConfigError
    from cifarlab.timing import threads_per_worker

    gpus = torch.cuda.device_count() if args.device in ("auto", "cuda") else 0
    if args.workers_per_gpu and not gpus:
        raise ConfigError("--workers-per-gpu needs a CUDA device, and this machine has none visible; use --workers")
    per_gpu = args.workers_per_gpu
    if per_gpu == "auto":  # measured for each architecture: ResNet-18 keeps a GPU busier than the custom ResNet
        per_gpu, why = choose_workers_per_gpu(**in_child(profile_one_worker, arch, splits, budget, args))
        console.print(f"{arch}: --workers-per-gpu auto: {why}", highlight=False)
    devices = worker_devices(args.workers, per_gpu, gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    threads = threads_per_worker(len(devices))
    procs = []
    for i, device in enumerate(devices):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        cmd = [sys.executable, "-m", "studies.onecycle", *worker_argv(raw_argv, arch, i, deadline)]
        procs.append(subprocess.Popen(cmd, env=env))
    shared = {d: devices.count(d) for d in devices if d is not None}
    on_gpus = ("" if not shared else ", one GPU each" if max(shared.values()) == 1 else
               ", " + ", ".join(f"{n} on GPU {d}" for d, n in shared.items()))
    console.print(f"{arch}: {len(devices)} workers started ({threads} thread{'s' if threads != 1 else ''} each"
                  f"{on_gpus})", highlight=False)
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(2)
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    bad = [p.returncode for p in procs if p.returncode != 0]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(devices)} workers failed (exit {bad}); rerun to resume")


def strip_flags(argv: list[str], names: set[str]) -> list[str]:
    out, skip = [], False
    valueless = {"--final", "--quiet", "--no-report", "--final-holdout", "--no-final-holdout"}
    for tok in argv:
        if skip:
            skip = False
            continue
        name = tok.split("=", 1)[0]
        if name in names:
            skip = "=" not in tok and name not in valueless
            continue
        out.append(tok)
    return out


