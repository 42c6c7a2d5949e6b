"""Study throughput (``python -m bench.devices --throughput``): trials per hour when K worker processes share one
device, each running whole trials at a budget's top rung the way a study worker does (its cache kept between
trials), for K = 1, 2, 4; with the device's busy share over the round, and what compiling costs and repays."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass

from studies import _cli

BUSY_SAMPLE_SECONDS = 0.5


@dataclass(frozen=True)
class Round:
    """One measurement: ``workers`` processes on ``device``, each running ``trials_each`` trials of ``arch``."""

    arch: str
    device: str
    workers: int
    trials_each: int
    epochs: int
    train_images: int
    val_images: int
    batch_size: int
    precision: str
    compile_mode: str | None  # None: eager
    data: str | None
    cache_dir: str | None
    seed: int = 0


def run_round(r: Round) -> dict:
    """Start ``r.workers`` spawned processes together and time their trials: a row of the throughput table."""
    import multiprocessing

    from cifarlab.timing import threads_per_worker

    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Barrier(r.workers)  # every worker has loaded torch and its data before the clock starts
    # A Pool starts all its processes at once (the barrier needs them all); each blocks on it with one task.
    with ctx.Pool(r.workers, initializer=_hold, initargs=(ready,)) as pool:
        done = pool.starmap(worker_trials, [(r, i, threads_per_worker(r.workers)) for i in range(r.workers)],
                            chunksize=1)
    trials = [t for worker in done for t in worker["trials"]]
    wall = max(t["end"] for t in trials) - min(t["start"] for t in trials)
    first = [w["trials"][0] for w in done]
    later = [t for w in done for t in w["trials"][1:]]
    busy = [s for w in done for s in w["busy"]]
    return {
        "arch": r.arch, "device": r.device, "device_name": done[0]["device_name"], "workers": r.workers,
        "mode": r.compile_mode or "eager", "trials": len(trials), "epochs": r.epochs, "train_images": r.train_images,
        "batch_size": r.batch_size, "precision": done[0]["precision"], "wall_seconds": wall,
        "trials_per_hour": len(trials) * 3600 / wall,
        "trial_seconds": statistics.median(t["seconds"] for t in trials),
        "overhead_seconds": statistics.median(t["seconds"] - t["epoch_seconds"] for t in trials),
        # outside the epochs in a worker's first trial (it builds its cache) and in its later ones (they reuse it)
        "first_overhead_seconds": statistics.median(t["seconds"] - t["epoch_seconds"] for t in first),
        "later_overhead_seconds": statistics.median(t["seconds"] - t["epoch_seconds"] for t in later)
        if later else math.nan,
        # the first trial of each worker compiles; the later ones reuse its graph
        "compile_seconds": statistics.median(t["compile_seconds"] for t in first) if r.compile_mode else 0.0,
        "later_trial_seconds": statistics.median(t["seconds"] for t in later) if later else math.nan,
        "busy_share": statistics.mean(busy) if busy else math.nan,
    }


def _hold(barrier) -> None:
    global _READY
    _READY = barrier


_READY = None


def worker_trials(r: Round, index: int, threads: int) -> dict:
    """In a worker process: ``r.trials_each`` trials through ``fit`` under one kept cache, as a study worker runs
    them; worker 0 samples the device's utilisation meanwhile (NVML sees every process's kernels)."""
    import threading

    import torch

    from cifarlab.config import TrainConfig
    from cifarlab.data import load_splits
    from cifarlab.keep import Kept, keeping
    from cifarlab.timing import cpu_model
    from cifarlab.train import fit

    torch.set_num_threads(threads)
    splits = load_splits(r.data, val_size=r.val_images, seed=r.seed, cache_dir=r.cache_dir)
    data = splits.with_train_subset(r.train_images, seed=r.seed)
    cache, trials, busy = Kept(), [], []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_utilisation, args=(r.device, busy, stop), daemon=True)
    _READY.wait()
    if index == 0 and r.device.startswith("cuda"):
        sampler.start()
    for n in range(r.trials_each):
        config = TrainConfig(arch=r.arch, epochs=r.epochs, batch_size=r.batch_size, optimizer="adam", max_lr=2e-3,
                             precision=r.precision, device=r.device, seed=r.seed + 100 * index + n,
                             compile=r.compile_mode is not None, compile_mode=r.compile_mode or "default")
        start = time.time()
        with keeping(cache):
            result = fit(config, data)
        end = time.time()
        trials.append({"start": start, "end": end, "seconds": end - start,
                       "epoch_seconds": sum(rec.epoch_seconds for rec in result.records),
                       "compile_seconds": result.compile_seconds or 0.0})
    stop.set()
    device = torch.device(r.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return {"trials": trials, "busy": busy, "device_name": name, "precision": result.precision}


def _sample_utilisation(device: str, samples: list[float], stop) -> None:
    """The device's utilisation (NVML's share of time with a kernel running), every half second until ``stop``."""
    import torch

    try:
        while not stop.wait(BUSY_SAMPLE_SECONDS):
            samples.append(torch.cuda.utilization(torch.device(device)) / 100)
    except (ModuleNotFoundError, RuntimeError):  # no NVML library or bindings: the busy share stays unknown
        samples.clear()


def repay_sentence(eager_trial: float, compiled_trial: float, compile_seconds: float, mode: str) -> str:
    """After how many trials a worker's compilation (once per shape) is repaid by faster trials."""
    saving = eager_trial - compiled_trial
    head = f"torch.compile ({mode}) took {compile_seconds:.1f} s once per worker and batch size"
    if saving <= 0:
        return f"{head}; a compiled trial took {-saving:.1f} s longer than an eager one: it never repays"
    return (f"{head} and saves {saving:.1f} s a trial ({eager_trial:.1f} → {compiled_trial:.1f} s): repaid after "
            f"{math.ceil(compile_seconds / saving)} trials")


def measure(args, devices: list[str], splits, out, console) -> None:
    """``bench.devices --throughput``: a round per device, architecture, batch size and K, then on CUDA a compiled
    round of one worker; ``throughput.csv``, ``throughput.json`` and a page under ``<out>/devices/``."""
    import pandas as pd

    from cifarlab.report.devices import throughput_page
    from cifarlab.report.records import new_record_dir, write_csv, write_json
    from cifarlab.timing import environment
    from studies._ladder import PRESETS

    preset = PRESETS[args.budget]
    train_images = preset.top_images(len(splits.train_labels))
    console.print(f"throughput at the {args.budget} budget's top rung: {preset.epochs} epochs x {train_images:,} "
                  f"images, validation {len(splits.val_labels):,}; {args.trials_each} trials per worker")
    rows, sentences = [], []
    for dev in devices:
        for arch in _cli.parse_archs(args.arch):
            for bs in args.batch_size:
                base = Round(arch, dev, 1, args.trials_each, preset.epochs, train_images, len(splits.val_labels), bs,
                             args.precision, None, args.data, args.cache_dir)
                rounds = [dataclasses.replace(base, workers=k) for k in args.workers_per_device]
                if dev.startswith("cuda") and not args.no_compile:
                    rounds.append(dataclasses.replace(base, compile_mode=args.compile_mode))
                for r in rounds:
                    rows.append(run_round(r))
                    console.print(_line(rows[-1]), highlight=False)
                sentence = _repay(rows[-len(rounds):])
                if sentence:
                    sentences.append(f"{arch} on {dev}, batch {bs}: {sentence}")
                    console.print(f"  {sentences[-1]}", highlight=False)
    frame = pd.DataFrame(rows)
    run_dir = new_record_dir(out, "devices", "throughput")
    write_csv(run_dir / "throughput.csv", frame)
    write_json(run_dir / "throughput.json", {"kind": "throughput", "environment": environment(),
                                             "rows": frame.to_dict("records"), "compile": sentences,
                                             "args": {k: v for k, v in vars(args).items() if k != "out"}})
    throughput_page(run_dir, frame, sentences)
    console.print(f"written: {run_dir / 'index.html'}")


def _line(row: dict) -> str:
    busy = "" if math.isnan(row["busy_share"]) else f", GPU busy {row['busy_share']:.0%}"
    return (f"  {row['arch']} on {row['device']}, {row['workers']} worker{'s' if row['workers'] > 1 else ''} "
            f"({row['mode']}): {row['trials_per_hour']:.1f} trials/h, {row['trial_seconds']:.1f} s a trial "
            f"(outside its epochs: {row['first_overhead_seconds']:.1f} s in a worker's first, "
            f"{row['later_overhead_seconds']:.1f} s in a later one){busy}")


def _repay(rows: list[dict]) -> str | None:
    """The repay sentence from a device's eager and compiled one-worker rounds, if both ran."""
    eager = next((r for r in rows if r["mode"] == "eager" and r["workers"] == 1), None)
    compiled = next((r for r in rows if r["mode"] != "eager"), None)
    if eager is None or compiled is None:
        return None
    steady = compiled["later_trial_seconds"]  # a worker's later trials reuse the graph
    if math.isnan(steady):
        steady = compiled["trial_seconds"] - compiled["compile_seconds"]
    plain = eager["later_trial_seconds"] if not math.isnan(eager["later_trial_seconds"]) else eager["trial_seconds"]
    return repay_sentence(plain, steady, compiled["compile_seconds"], compiled["mode"])
