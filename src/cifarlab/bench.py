"""Epoch timing of exactly the step ``fit()`` trains with (``TrainStep``): warm-up excluded, the device
synchronised at every clock read, the median of the repetitions reported. Cases compared with each other take
turns, a repetition each, so that a slow spell of the machine falls on all of them."""

from __future__ import annotations

import dataclasses
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from cifarlab import cpu
from cifarlab.config import TrainConfig
from cifarlab.data import DataSplits
from cifarlab.evaluate import evaluate
from cifarlab.timing import Timer, configure_device
from cifarlab.train import setup_training

EPOCH_IMAGES = 50_000  # the seeds' "epoch" is the whole CIFAR-10 training set


@dataclass(frozen=True)
class Case:
    arch: str
    device: str
    batch_size: int = 512
    precision: str = "bf16"  # bf16 or fp32 (resolved, not auto)
    channels_last: bool = True
    data_path: str = "batched"  # batched (in-memory, on device) or dataloader (seed: per-sample albumentations)
    compile: bool = False
    compile_mode: str = "default"  # torch.compile's mode; reduce-overhead replays CUDA graphs
    fused_optimizer: bool = True  # the seed's optimizer loops over its tensors; torch's fused kernel does not
    retain_memory: bool = True  # CPU: freed memory stays in the process (cifarlab.cpu), as fit() keeps it
    seed_layers: bool = False  # the seed's recipe (SEED_RECIPE) instead of the default one
    step: str = ""  # the ablation step's name, when part of a ladder
    loader_workers: int = 2


@dataclass
class CaseResult:
    case: Case
    images_timed: int
    repeats: int
    seconds: list[float]  # per repetition, training only
    data_seconds: float  # of one per-step-synchronised repetition
    compute_seconds: float
    eval_seconds_per_image: float
    peak_memory_mb: float
    compile_seconds: float | None
    breakdown: list[dict] | None = None  # seconds per step by kind of operation (op_breakdown), when asked
    model: nn.Module | None = field(default=None, repr=False)  # the model timed, for the per-conv table

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)

    @property
    def images_per_second(self) -> float:
        return self.images_timed / self.median_seconds

    def row(self, *, train_images: int, val_images: int, flops: dict | None = None,
            peak_flops: float | None = None) -> dict:
        ips = self.images_per_second
        train_s = train_images / ips
        eval_s = val_images * self.eval_seconds_per_image
        whole = self.images_timed + self.case.batch_size > train_images  # all full batches of the split
        split = self.data_seconds + self.compute_seconds
        spread = 100 * (max(self.seconds) - min(self.seconds)) / self.median_seconds
        row = {**asdict(self.case), "images_timed": self.images_timed, "repeats": self.repeats,
               "seconds_median": self.median_seconds, "seconds_min": min(self.seconds),
               "seconds_max": max(self.seconds), "spread_pct": spread, "images_per_second": ips,
               "epoch_seconds": train_s + eval_s, "epoch_50k_seconds": EPOCH_IMAGES / ips,
               "epoch_kind": "measured" if whole else "projected",
               "data_share": self.data_seconds / split if split else float("nan"),
               "compute_share": self.compute_seconds / split if split else float("nan"),
               "eval_seconds_per_epoch": eval_s, "eval_share": eval_s / (train_s + eval_s),
               "peak_memory_mb": self.peak_memory_mb, "compile_seconds": self.compile_seconds, "status": "ok"}
        if flops is not None:
            achieved = ips * flops["train"]
            row["train_gflop_per_image"] = flops["train"] / 1e9
            row["achieved_tflops"] = achieved / 1e12
            row["peak_tflops"] = peak_flops / 1e12 if peak_flops else float("nan")
            row["share_of_peak"] = achieved / peak_flops if peak_flops else float("nan")
        return row


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (kB on Linux)


class _Batches:
    """An endless stream of the case's training batches. ``settle()`` waits until a DataLoader's workers have
    every batch they were asked to prefetch, so that a repetition is charged with the augmentation its own steps
    set off rather than leaving it to run while the next case is timed."""

    def __init__(self, batches) -> None:
        self.source = batches
        self._stream = self._forever()

    def _forever(self):
        while True:
            yield from self.source.epoch()

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return next(self._stream)

    def settle(self, timeout: float = 60.0) -> None:
        it = self.source.loader_iter
        if it is None or not getattr(it, "_num_workers", 0):
            return
        deadline = time.perf_counter() + timeout
        try:  # DataLoader internals: batches asked of the workers, and those ready in the result queue
            while it._data_queue.qsize() < it._tasks_outstanding and time.perf_counter() < deadline:
                time.sleep(0.002)
        except (AttributeError, NotImplementedError):  # another torch's iterator, or no qsize on this platform
            pass

    def close(self) -> None:
        self._stream.close()  # stops the DataLoader workers of the seed-style path


class CaseRun:
    """One case built and warmed up, then timed a repetition at a time, so that several cases can take turns."""

    def __init__(self, case: Case, splits: DataSplits, *, images: int, warmup_steps: int = 5) -> None:
        self.case, self.splits = case, splits
        self.device = device = torch.device(case.device)
        configure_device(device)  # as fit() does: cuDNN's autotuner on CUDA
        self._retained_before = cpu.freed_memory_retained()  # put back by close()
        self._memory()
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        self.config = config = case_config(case)
        self.steps = max(1, images // case.batch_size)
        # a one-cycle schedule as fit() builds one: its cost is timed, not its LR (a step past the end keeps the last)
        self.norm, batches, self.train_step = setup_training(config, splits, device, case.precision,
                                                             case.channels_last, gen, total_steps=self.steps * 10,
                                                             fused=case.fused_optimizer)
        self.model, self.batches = self.train_step.model, _Batches(batches)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.seconds: list[float] = []
        for _ in range(warmup_steps):  # oneDNN / cuDNN build their kernels on first use; compile happens here too
            self.train_step(*next(self.batches))
        self.compile_seconds = self.train_step.compile_seconds if case.compile else None
        self.batches.settle()

    def close(self) -> None:
        """Close the case's data stream, and leave freed memory as it was before the case was built."""
        self.batches.close()
        cpu.retain_freed_memory(self._retained_before)

    def _memory(self) -> None:
        """This case's way with freed memory (process-wide, so set again whenever the case's turn comes)."""
        cpu.retain_freed_memory(self.case.retain_memory and self.device.type == "cpu")

    def repeat(self) -> float:
        """Time one repetition: ``steps`` training steps, and the augmentation they leave the workers to do."""
        self._memory()
        with Timer(self.device) as t:
            for _ in range(self.steps):
                self.train_step(*next(self.batches))
            self.batches.settle()
        self.seconds.append(t.seconds)
        return t.seconds

    def finish(self, *, eval_images: int = 1024, profile_steps: int = 0) -> CaseResult:
        """The data/compute split, the profile when asked, evaluation speed; then the data stream is closed."""
        device, batches, train_step = self.device, self.batches, self.train_step
        self._memory()
        data_s = compute_s = 0.0
        for _ in range(self.steps):  # the split: a synchronised clock read around each part of each step
            with Timer(device) as td:
                x, y = next(batches)
            with Timer(device) as tc:
                train_step(x, y)
            data_s += td.seconds
            compute_s += tc.seconds
        breakdown = None
        if profile_steps:
            from cifarlab.breakdown import DATA_ANNOTATION, op_breakdown

            def profiled_step() -> None:
                with torch.profiler.record_function(DATA_ANNOTATION):
                    x, y = next(batches)
                train_step(x, y)

            breakdown = op_breakdown(profiled_step, device, steps=profile_steps)
        splits = self.splits
        n_eval = min(eval_images, len(splits.val_labels))
        images, labels = splits.val_images[:n_eval], splits.val_labels[:n_eval]
        eval_kw = {"device": device, "precision": self.case.precision, "channels_last": self.case.channels_last,
                   "batch_size": self.config.eval_batch_size}
        evaluate(train_step.eval_model, images, labels, self.norm, **eval_kw)  # warm-up
        with Timer(device) as te:
            evaluate(train_step.eval_model, images, labels, self.norm, **eval_kw)
        self.close()
        return CaseResult(case=self.case, images_timed=self.steps * self.case.batch_size,
                          repeats=len(self.seconds), seconds=list(self.seconds), data_seconds=data_s,
                          compute_seconds=compute_s, eval_seconds_per_image=te.seconds / n_eval,
                          peak_memory_mb=peak_memory_mb(device), compile_seconds=self.compile_seconds,
                          breakdown=breakdown, model=self.model)


# The seed projects' recipe where the default one differs: their layers, augmentation and no EMA. Ladder rungs
# before "+ the recipe's layers" train it.
SEED_RECIPE = {"activation": "relu", "ghost_batch": 0, "bn_scale": "learned", "whiten": False, "ema": 0.0,
               "crop_pad": 4, "cutout": 8}


def case_config(case: Case) -> TrainConfig:
    """The training config whose step a case times: the default recipe, or the seed's, on the case's path."""
    return TrainConfig(arch=case.arch, batch_size=case.batch_size, precision=case.precision, device=case.device,
                       augment=case.data_path, loader_workers=case.loader_workers, compile=case.compile,
                       compile_mode=case.compile_mode, retain_memory=case.retain_memory,
                       **(SEED_RECIPE if case.seed_layers else {}))


def time_cases(cases: list[Case], splits: DataSplits, *, images: int, repeats: int = 3, warmup_steps: int = 5,
               eval_images: int = 1024, profile_steps: int = 0) -> list[CaseResult]:
    """Time cases that are to be compared, taking turns: repetition r of every case, then r + 1, so that a slow spell
    of the machine falls on all of them. All cases are built and warmed up first."""
    retained = cpu.freed_memory_retained()
    try:
        runs = [CaseRun(case, splits, images=images, warmup_steps=warmup_steps) for case in cases]
        for _ in range(repeats):
            for run in runs:
                run.repeat()
        return [run.finish(eval_images=eval_images, profile_steps=profile_steps) for run in runs]
    finally:
        cpu.retain_freed_memory(retained)


CHOICE_STEP = "{precision} · {layout}"


# bf16 whose matmul runs under this fraction of fp32's is emulated (an AVX2-only CPU: 1-2 GFLOP/s against 120):
# timing a training step in it would take hours and could only lose.
EMULATED_BF16 = 0.25


def choice_precisions(device: str, peaks: dict[str, float]) -> tuple[list[str], str]:
    """The precisions ``--choose`` times on ``device``, and why any is left out (empty when none is)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        return ["fp32"], "bf16 left out: this GPU does not support it"
    if peaks["bf16"] < EMULATED_BF16 * peaks["fp32"]:
        return ["fp32"], (f"bf16 left out: its matmul ran at {peaks['bf16'] / 1e9:.1f} GFLOP/s here, "
                          f"1/{peaks['fp32'] / max(peaks['bf16'], 1.0):.0f} of fp32's (no bf16 units)")
    return ["fp32", "bf16"], ""


def choice_cases(arch: str, device: str, batch_size: int, precisions: list[str] | None = None) -> list[Case]:
    """Each precision x memory-format combination on the batched data path, for ``bench.devices --choose``."""
    return [Case(arch, device, batch_size, precision, cl, "batched",
                 step=CHOICE_STEP.format(precision=precision, layout="channels_last" if cl else "NCHW"))
            for precision in precisions or ["fp32", "bf16"] for cl in (False, True)]


def recipe_layers_differ() -> bool:
    defaults = TrainConfig()
    return any(getattr(defaults, k) != v for k, v in SEED_RECIPE.items())


def ablation_ladder(arch: str, device: str, batch_size: int, *, precision: str = "bf16", channels_last: bool = True,
                    with_compile: bool = True) -> list[Case]:
    """The seed-style baseline, then each speed technique of the default path (``precision``, ``channels_last``: the
    path training takes on this device) added in turn; the last rung before ``torch.compile`` is what training runs."""
    on_cpu = torch.device(device).type == "cpu"
    rung = Case(arch, device, batch_size, precision="fp32", channels_last=False, data_path="dataloader",
                fused_optimizer=False, retain_memory=False, seed_layers=True,
                step="seed baseline (fp32, NCHW, DataLoader + albumentations)")
    ladder = [rung]
    changes = [(precision == "bf16", {"precision": "bf16"}, "+ bf16 autocast"),
               (channels_last, {"channels_last": True}, "+ channels_last"),
               (True, {"data_path": "batched"}, "+ batched in-memory data"),
               (True, {"fused_optimizer": True}, "+ fused optimizer"),
               (on_cpu, {"retain_memory": True}, "+ freed memory kept"),
               (recipe_layers_differ(), {"seed_layers": False}, "+ the recipe's layers"),
               (with_compile, {"compile": True}, "+ torch.compile"),
               (with_compile and not on_cpu, {"compile_mode": "reduce-overhead"}, "+ torch.compile, CUDA graphs")]
    for wanted, change, name in changes:
        if wanted:
            rung = dataclasses.replace(rung, **change, step=name)
            ladder.append(rung)
    return ladder
