"""Epoch timing the way ``fit()`` trains: warm-up excluded, device synchronised at every clock read.

Each case trains ``images`` images (``images // batch_size`` steps) ``repeats`` times after ``warmup_steps``
untimed steps; the median and spread of those repetitions are reported. Cases that are compared with each other
take turns, one repetition each (``time_cases``), so that a slow spell of the machine falls on all of them. One
further repetition synchronises the device around every step to split the time into data/augmentation and
forward+backward+step (per-step synchronisation removes CPU/GPU overlap, so that repetition is not used for the
throughput). Evaluation is timed on the validation split at inference speed.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from cifarlab.augment import (
    AlbumentationsDataset,
    AugmentConfig,
    BatchAugmenter,
    Normalization,
    reseed_worker,
    seed_pipeline,
)
from cifarlab.data import DataSplits
from cifarlab.hostmem import freed_memory_retained, retain_freed_memory
from cifarlab.timing import Timer, configure_device, synchronize
from cifarlab.train import TrainConfig, autocast, build_model, build_optimizer, evaluate

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
    matmul_convs: bool = True  # CPU: 3x3 convs on <= 4x4 maps as GEMMs (cifarlab.matmul_conv)
    winograd: bool = True  # CPU in fp32: 3x3 convs of >= 64 channels by Winograd F(4x4, 3x3) (cifarlab.winograd)
    retain_memory: bool = True  # CPU: freed memory stays in the process (cifarlab.hostmem), as fit() keeps it
    seed_layers: bool = False  # the seed's layers (ReLU, plain BN, unwhitened) instead of the default recipe's
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
        row = {
            **asdict(self.case),
            "images_timed": self.images_timed,
            "repeats": self.repeats,
            "seconds_median": self.median_seconds,
            "seconds_min": min(self.seconds),
            "seconds_max": max(self.seconds),
            "spread_pct": 100 * (max(self.seconds) - min(self.seconds)) / self.median_seconds,
            "images_per_second": ips,
            "epoch_seconds": train_s + eval_s,
            "epoch_50k_seconds": EPOCH_IMAGES / ips,
            "epoch_kind": "measured" if whole else "projected",
            "data_share": self.data_seconds / split if split else float("nan"),
            "compute_share": self.compute_seconds / split if split else float("nan"),
            "eval_seconds_per_epoch": eval_s,
            "eval_share": eval_s / (train_s + eval_s),
            "peak_memory_mb": self.peak_memory_mb,
            "compile_seconds": self.compile_seconds,
            "status": "ok",
        }
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
    """An endless stream of training batches by the case's data path.

    ``settle()`` waits until a DataLoader's workers have every batch they were asked to prefetch ready. Called at
    the end of each timed repetition, inside it, it charges the repetition with the augmentation work its own
    steps set off, instead of leaving that work to run during whatever is timed next: the next repetition of
    the same case in steady state (no difference), or another case when cases take turns (``time_cases``).
    """

    def __init__(self, case: Case, splits: DataSplits, norm: Normalization, device: torch.device,
                 gen: torch.Generator) -> None:
        self.case, self.device, self._iter = case, device, None
        if case.data_path == "batched":
            aug = BatchAugmenter(splits.train_images, splits.train_labels, norm, device, AugmentConfig(),
                                 case.channels_last)
            self._loader = None
            self._stream = self._from_augmenter(aug, gen)
            return
        dataset = AlbumentationsDataset(splits.train_images, splits.train_labels, seed_pipeline(norm))
        self._loader = torch.utils.data.DataLoader(
            dataset, batch_size=case.batch_size, shuffle=True, drop_last=True, num_workers=case.loader_workers,
            generator=gen, pin_memory=device.type == "cuda", persistent_workers=case.loader_workers > 0,
            worker_init_fn=reseed_worker)
        self._stream = self._from_loader()

    def _from_augmenter(self, aug: BatchAugmenter, gen: torch.Generator):
        while True:
            yield from aug.epoch(self.case.batch_size, gen)

    def _from_loader(self):
        while True:
            self._iter = iter(self._loader)
            for x, y in self._iter:
                x = x.to(self.device, non_blocking=True)
                if self.case.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                yield x, y.to(self.device, non_blocking=True)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return next(self._stream)

    def settle(self, timeout: float = 60.0) -> None:
        it = self._iter
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
        self._iter = self._loader = None


class CaseRun:
    """One case built and warmed up, then timed a repetition at a time, so that several cases can take turns."""

    def __init__(self, case: Case, splits: DataSplits, *, images: int, warmup_steps: int = 5) -> None:
        self.case, self.splits = case, splits
        self.device = device = torch.device(case.device)
        configure_device(device)  # as fit() does: cuDNN's autotuner on CUDA
        self._retained_before = freed_memory_retained()  # put back by close()
        self._memory()
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        self.norm = norm = Normalization.from_images(splits.train_images)
        config = TrainConfig(arch=case.arch, batch_size=case.batch_size, precision=case.precision,
                             device=case.device, **(SEED_LAYERS if case.seed_layers else {}))
        # The model training builds (its recipe's whitening and frozen BN scales), with this case's kernels.
        self.model = model = build_model(config, splits, norm, device, case.channels_last, generator=gen,
                                         matmul_convs=case.matmul_convs, winograd=case.winograd)
        step_model: nn.Module = torch.compile(model, mode=case.compile_mode) if case.compile else model
        optimizer = build_optimizer(config, model, fused=case.fused_optimizer)
        criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.batches = _Batches(case, splits, norm, device, gen)
        self.steps = max(1, images // case.batch_size)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def train_step(x: torch.Tensor, y: torch.Tensor) -> None:
            with autocast(device, case.precision):
                loss = criterion(step_model(x).float() * config.logit_scale, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        self.train_step = train_step
        self.compile_seconds = None
        self.seconds: list[float] = []
        model.train()
        for i in range(warmup_steps):  # oneDNN / cuDNN build their kernels on first use; compile happens here too
            t0 = time.perf_counter()
            train_step(*next(self.batches))
            if i == 0 and case.compile:
                synchronize(device)
                self.compile_seconds = time.perf_counter() - t0
        self.batches.settle()

    def close(self) -> None:
        """Close the case's data stream, and leave freed memory as it was before the case was built."""
        self.batches.close()
        retain_freed_memory(self._retained_before)

    def _memory(self) -> None:
        """This case's way with freed memory (process-wide, so set again whenever the case's turn comes)."""
        retain_freed_memory(self.case.retain_memory and self.device.type == "cpu")

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
        for _ in range(self.steps):  # the breakdown: a synchronised clock read around each part of each step
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
        splits, model = self.splits, self.model
        n_eval = min(eval_images, len(splits.val_labels))
        eval_kw = {"device": device, "precision": self.case.precision, "channels_last": self.case.channels_last,
                   "batch_size": 1024}
        evaluate(model, splits.val_images[:n_eval], splits.val_labels[:n_eval], self.norm, **eval_kw)  # warm-up
        with Timer(device) as te:
            evaluate(model, splits.val_images[:n_eval], splits.val_labels[:n_eval], self.norm, **eval_kw)
        self.close()
        return CaseResult(case=self.case, images_timed=self.steps * self.case.batch_size,
                          repeats=len(self.seconds), seconds=list(self.seconds), data_seconds=data_s,
                          compute_seconds=compute_s, eval_seconds_per_image=te.seconds / n_eval,
                          peak_memory_mb=peak_memory_mb(device), compile_seconds=self.compile_seconds,
                          breakdown=breakdown, model=model)


def time_cases(cases: list[Case], splits: DataSplits, *, images: int, repeats: int = 3, warmup_steps: int = 5,
               eval_images: int = 1024, profile_steps: int = 0) -> list[CaseResult]:
    """Time cases that are to be compared, taking turns: repetition r of every case, then repetition r + 1.

    A shared machine has slow spells that last minutes (its matmul probe read 1.9 TFLOP/s bf16 and 0.9 a few
    minutes apart). Timed one after another, a ladder's later steps can land in one and read as a loss that is
    the machine's; taking turns puts every case's repetitions in the same stretches of time, so their medians
    compare. All cases are built and warmed up first (their models and data stay in memory together).
    """
    retained = freed_memory_retained()
    try:
        runs = [CaseRun(case, splits, images=images, warmup_steps=warmup_steps) for case in cases]
        for _ in range(repeats):
            for run in runs:
                run.repeat()
        return [run.finish(eval_images=eval_images, profile_steps=profile_steps) for run in runs]
    finally:
        retain_freed_memory(retained)


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


# The seed's layers, where the default recipe swaps them for Page's (CELU, ghost BN, frozen scales, whitening).
SEED_LAYERS = {"activation": "relu", "ghost_batch": 0, "bn_scale": "learned", "whiten": False}


def recipe_layers_differ() -> bool:
    defaults = TrainConfig()
    return any(getattr(defaults, k) != v for k, v in SEED_LAYERS.items())


def ablation_ladder(arch: str, device: str, batch_size: int, *, precision: str = "bf16", channels_last: bool = True,
                    with_compile: bool = True) -> list[Case]:
    """The seed-style baseline, then each speed technique of the default path added in turn.

    ``precision`` and ``channels_last`` are the default path's on this device (``resolve_speed``): a CPU without
    bf16 units trains in fp32, so its ladder has no bf16 rung, and one that trains NCHW has no channels_last rung.
    The last rung before ``torch.compile`` is what ``studies.train`` runs.
    """
    base = Case(arch, device, batch_size, precision="fp32", channels_last=False, data_path="dataloader",
                fused_optimizer=False, matmul_convs=False, winograd=False, retain_memory=False, seed_layers=True,
                step="seed baseline (fp32, NCHW, DataLoader + albumentations)")
    seed_kernels = {"fused_optimizer": False, "matmul_convs": False, "winograd": False, "retain_memory": False,
                    "seed_layers": True}
    p, cl = precision, channels_last
    steps = [base]
    if p == "bf16":
        steps.append(Case(arch, device, batch_size, "bf16", False, "dataloader", **seed_kernels,
                          step="+ bf16 autocast"))
    if cl:
        steps.append(Case(arch, device, batch_size, p, True, "dataloader", **seed_kernels, step="+ channels_last"))
    steps += [
        Case(arch, device, batch_size, p, cl, "batched", **seed_kernels, step="+ batched in-memory data"),
        Case(arch, device, batch_size, p, cl, "batched", matmul_convs=False, winograd=False, retain_memory=False,
             seed_layers=True, step="+ fused optimizer"),
    ]
    if torch.device(device).type == "cpu":
        steps.append(Case(arch, device, batch_size, p, cl, "batched", matmul_convs=False, winograd=False,
                          seed_layers=True, step="+ freed memory kept"))
        steps.append(Case(arch, device, batch_size, p, cl, "batched", winograd=False, seed_layers=True,
                          step="+ 4x4 convs as GEMMs"))
        if p == "fp32":  # Winograd takes fp32 convs only: a CPU without bf16 units
            steps.append(Case(arch, device, batch_size, p, cl, "batched", seed_layers=True,
                              step="+ Winograd 3x3 convs"))
    if recipe_layers_differ():  # what the default recipe's layers cost or save
        steps.append(Case(arch, device, batch_size, p, cl, "batched", step="+ the recipe's layers"))
    if with_compile:
        steps.append(Case(arch, device, batch_size, p, cl, "batched", compile=True, step="+ torch.compile"))
        if torch.device(device).type == "cuda":  # a GPU that waits on the host: one launch per graph
            steps.append(Case(arch, device, batch_size, p, cl, "batched", compile=True,
                              compile_mode="reduce-overhead", step="+ torch.compile, CUDA graphs"))
    return steps
