"""Epoch timing the way ``fit()`` trains: warm-up excluded, device synchronised at every clock read.

Each case trains ``images`` images (``images // batch_size`` steps) ``repeats`` times after ``warmup_steps``
untimed steps; the median and spread of those repetitions are reported. One further repetition synchronises
the device around every step to split the time into data/augmentation and forward+backward+step (per-step
synchronisation removes CPU/GPU overlap, so that repetition is not used for the throughput). Evaluation is
timed on the validation split at inference speed.
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


def _batches(case: Case, splits: DataSplits, norm: Normalization, device: torch.device, gen: torch.Generator):
    """An endless stream of training batches by the case's data path."""
    if case.data_path == "batched":
        aug = BatchAugmenter(splits.train_images, splits.train_labels, norm, device, AugmentConfig(),
                             case.channels_last)
        while True:
            yield from aug.epoch(case.batch_size, gen)
    dataset = AlbumentationsDataset(splits.train_images, splits.train_labels, seed_pipeline(norm))
    loader = torch.utils.data.DataLoader(dataset, batch_size=case.batch_size, shuffle=True, drop_last=True,
                                         num_workers=case.loader_workers, generator=gen,
                                         pin_memory=device.type == "cuda",
                                         persistent_workers=case.loader_workers > 0, worker_init_fn=reseed_worker)
    while True:
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            if case.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(device, non_blocking=True)


def time_case(case: Case, splits: DataSplits, *, images: int, repeats: int = 3, warmup_steps: int = 5,
              eval_images: int = 1024, profile_steps: int = 0) -> CaseResult:
    """Time ``case``; with ``profile_steps`` also profile that many steps into a breakdown by kind of operation."""
    device = torch.device(case.device)
    configure_device(device)  # as fit() does: cuDNN's autotuner on CUDA
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    norm = Normalization.from_images(splits.train_images)
    config = TrainConfig(arch=case.arch, batch_size=case.batch_size, precision=case.precision, device=case.device,
                         **(SEED_LAYERS if case.seed_layers else {}))
    # The model training builds (its recipe's whitening and frozen BN scales), with this case's kernels.
    model = build_model(config, splits, norm, device, case.channels_last, generator=gen,
                        matmul_convs=case.matmul_convs)
    step_model: nn.Module = torch.compile(model, mode=case.compile_mode) if case.compile else model
    optimizer = build_optimizer(config, model, fused=case.fused_optimizer)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    batches = _batches(case, splits, norm, device, gen)
    steps = max(1, images // case.batch_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def train_step(x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast(device, case.precision):
            loss = criterion(step_model(x).float() * config.logit_scale, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    compile_seconds = None
    model.train()
    for i in range(warmup_steps):  # oneDNN / cuDNN build their kernels on first use; compile happens here too
        t0 = time.perf_counter()
        train_step(*next(batches))
        if i == 0 and case.compile:
            synchronize(device)
            compile_seconds = time.perf_counter() - t0
    seconds = []
    for _ in range(repeats):
        with Timer(device) as t:
            for _ in range(steps):
                train_step(*next(batches))
        seconds.append(t.seconds)
    data_s = compute_s = 0.0
    for _ in range(steps):  # the breakdown: a synchronised clock read around each part of each step
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
    n_eval = min(eval_images, len(splits.val_labels))
    eval_kw = {"device": device, "precision": case.precision, "channels_last": case.channels_last,
               "batch_size": 1024}
    evaluate(model, splits.val_images[:n_eval], splits.val_labels[:n_eval], norm, **eval_kw)  # warm-up
    with Timer(device) as te:
        evaluate(model, splits.val_images[:n_eval], splits.val_labels[:n_eval], norm, **eval_kw)
    batches.close()  # stops DataLoader workers of the seed-style path
    return CaseResult(case=case, images_timed=steps * case.batch_size, repeats=repeats, seconds=seconds,
                      data_seconds=data_s, compute_seconds=compute_s, eval_seconds_per_image=te.seconds / n_eval,
                      peak_memory_mb=peak_memory_mb(device), compile_seconds=compile_seconds, breakdown=breakdown,
                      model=model)


CHOICE_STEP = "{precision} · {layout}"


def choice_cases(arch: str, device: str, batch_size: int) -> list[Case]:
    """The four precision x memory-format combinations on the batched data path, for ``bench.devices --choose``."""
    dev = torch.device(device)
    precisions = ["fp32"] if dev.type == "cuda" and not torch.cuda.is_bf16_supported() else ["fp32", "bf16"]
    return [Case(arch, device, batch_size, precision, cl, "batched",
                 step=CHOICE_STEP.format(precision=precision, layout="channels_last" if cl else "NCHW"))
            for precision in precisions for cl in (False, True)]


# The seed's layers, where the default recipe swaps them for Page's (CELU, ghost BN, frozen scales, whitening).
SEED_LAYERS = {"activation": "relu", "ghost_batch": 0, "bn_scale": "learned", "whiten": False}


def recipe_layers_differ() -> bool:
    defaults = TrainConfig()
    return any(getattr(defaults, k) != v for k, v in SEED_LAYERS.items())


def ablation_ladder(arch: str, device: str, batch_size: int, *, with_compile: bool = True) -> list[Case]:
    """The seed-style baseline, then each speed technique added in turn."""
    base = Case(arch, device, batch_size, precision="fp32", channels_last=False, data_path="dataloader",
                fused_optimizer=False, matmul_convs=False, seed_layers=True,
                step="seed baseline (fp32, NCHW, DataLoader + albumentations)")
    seed_kernels = {"fused_optimizer": False, "matmul_convs": False, "seed_layers": True}
    steps = [
        base,
        Case(arch, device, batch_size, "bf16", False, "dataloader", **seed_kernels, step="+ bf16 autocast"),
        Case(arch, device, batch_size, "bf16", True, "dataloader", **seed_kernels, step="+ channels_last"),
        Case(arch, device, batch_size, "bf16", True, "batched", **seed_kernels, step="+ batched in-memory data"),
        Case(arch, device, batch_size, "bf16", True, "batched", matmul_convs=False, seed_layers=True,
             step="+ fused optimizer"),
    ]
    if torch.device(device).type == "cpu":
        steps.append(Case(arch, device, batch_size, "bf16", True, "batched", seed_layers=True,
                          step="+ 4x4 convs as GEMMs"))
    if recipe_layers_differ():  # what the default recipe's layers cost or save
        steps.append(Case(arch, device, batch_size, "bf16", True, "batched", step="+ the recipe's layers"))
    if with_compile:
        steps.append(Case(arch, device, batch_size, "bf16", True, "batched", compile=True, step="+ torch.compile"))
        if torch.device(device).type == "cuda":  # a GPU that waits on the host: one launch per graph
            steps.append(Case(arch, device, batch_size, "bf16", True, "batched", compile=True,
                              compile_mode="reduce-overhead", step="+ torch.compile, CUDA graphs"))
    return steps
