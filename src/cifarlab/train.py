"""One-cycle training: ``TrainConfig`` -> ``fit()`` -> per-epoch ``EpochRecord`` s.

The loop keeps the data on the training device and synchronises the host only at logging points (every
``log_every`` steps, for the progress callback and the divergence check) and at epoch edges (for timing
and evaluation). On the CPU every op is synchronous anyway.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab import faults
from cifarlab.augment import AugmentConfig, BatchAugmenter, EvalBatches, Normalization
from cifarlab.choices import resolve_speed
from cifarlab.data import DataSplits, atomic_file
from cifarlab.errors import ConfigError, TrainingDiverged
from cifarlab.hostmem import retained_memory
from cifarlab.matmul_conv import DEFAULT_MAX_PIXELS, use_matmul_convs
from cifarlab.models import create_model, list_models
from cifarlab.models.layers import ACTIVATIONS, use_activation, use_ghost_batch_norm
from cifarlab.timing import Timer, configure_device, resolve_device, synchronize
from cifarlab.whitening import whiten_first_conv
from cifarlab.winograd import DEFAULT_MIN_CHANNELS

OPTIMIZERS = ("sgd", "adam", "adamw")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run. Units in the help text; defaults are the tool's recipe."""

    arch: str = field(default="custom_resnet", metadata={"help": "architecture: " + ", ".join(list_models())})
    epochs: int = field(default=10, metadata={"help": "training epochs"})
    batch_size: int = field(default=512, metadata={"help": "images per training step"})
    optimizer: str = field(default="sgd", metadata={"help": "sgd (Nesterov momentum), adam or adamw"})
    max_lr: float = field(default=1.0, metadata={"help": "peak learning rate of the one-cycle schedule"})
    weight_decay: float = field(default=5e-4, metadata={"help": "L2 (sgd, adam) or decoupled (adamw) weight decay"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum / Adam beta1 when not cycled"})
    cycle_momentum: bool = field(default=False, metadata={"help": "cycle momentum inversely to the LR (0.85-0.95)"})
    pct_start: float = field(default=0.25, metadata={"help": "fraction of steps spent raising the LR to its peak"})
    div_factor: float = field(default=25.0, metadata={"help": "initial LR = max_lr / div_factor"})
    final_div_factor: float = field(default=1e4, metadata={"help": "final LR = initial LR / final_div_factor"})
    anneal_strategy: str = field(default="linear", metadata={"help": "linear or cos"})
    three_phase: bool = field(default=False, metadata={"help": "OneCycleLR's three-phase variant"})
    label_smoothing: float = field(default=0.2, metadata={"help": "cross-entropy label smoothing in [0, 1)"})
    logit_scale: float = field(default=0.0625, metadata={
        "help": "multiply logits by this before the loss (DAWNBench's 0.125; 1 for none)"})
    crop_pad: int = field(default=2, metadata={
        "help": "pixels of reflect padding before the random 32x32 crop, i.e. the largest shift (0: no crop)"})
    cutout: int = field(default=0, metadata={"help": "cutout hole side in pixels (0: off)"})
    cutout_p: float = field(default=0.5, metadata={"help": "probability of a cutout hole per image"})
    alternate_flip: bool = field(default=False, metadata={
        "help": "flip each image at random in the first epoch, then in every other epoch (airbench); "
                "batched augmentation only"})
    ema: float = field(default=0.99, metadata={
        "help": "decay per step of an exponential moving average of the weights (and BN statistics), which is "
                "then validated and tested in their place (0: off; e.g. 0.99)"})
    activation: str = field(default="celu", metadata={"help": "relu, or celu: CELU(0.3), as in Page's recipe"})
    ghost_batch: int = field(default=32, metadata={
        "help": "images per ghost batch for batch-norm statistics in training: a batch splits into batch // N "
                "ghost batches as equal as they can be, each of at least N images (0: the whole batch; Page: 32)"})
    bn_scale: str = field(default="frozen", metadata={
        "help": "learned, or frozen: batch-norm scales fixed at 1, as in Page's 10-epoch recipe"})
    bias_lr_scale: float = field(default=64.0, metadata={
        "help": "SGD only: learning rate multiple for biases (batch-norm shifts), whose weight decay is divided "
                "by it (Page: 64); Adam and AdamW scale each parameter's step themselves and ignore it"})
    whiten: bool = field(default=True, metadata={
        "help": "parametrise the first conv through the patch-whitening basis of the training images (Page's "
                "input whitening; same architecture and parameter count)"})
    matmul_convs: bool = field(default=True, metadata={
        "help": "on the CPU, run 3x3 convs on maps of 4x4 or less as matrix products (oneDNN's kernels reach a "
                "quarter of the matmul peak there); no effect on CUDA"})
    winograd: bool = field(default=True, metadata={
        "help": "where the CPU trains in fp32 (no bf16 units), run 3x3 convs of 64 or more input and 128 or more "
                "output channels by Winograd's F(4x4,3x3): 4x fewer multiplications, 1.5x the custom ResNet's step "
                "on a 2-core EPYC; no effect in bf16 or on CUDA"})
    retain_memory: bool = field(default=True, metadata={
        "help": "on the CPU, keep freed memory in the process instead of returning it to the kernel after every "
                "step and page-faulting it back (glibc's malloc; cifarlab.hostmem): custom-ResNet steps at batch 512 "
                "on a 2-core EPYC spent 4 s of system time in 11 steps against 40 without it; changes no result"})
    precision: str = field(default="auto", metadata={"help": "auto, bf16 or fp32 (auto: bf16 where fast)"})
    channels_last: str = field(default="auto", metadata={"help": "auto, on or off"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (compile time reported apart)"})
    compile_mode: str = field(default="default", metadata={
        "help": "torch.compile's mode with --compile: default, reduce-overhead (CUDA graphs: one launch per "
                "graph instead of one per kernel, for GPUs that wait on the host), max-autotune or "
                "max-autotune-no-cudagraphs"})
    augment: str = field(default="batched", metadata={"help": "batched (in-memory, on device) or dataloader (seed)"})
    loader_workers: int = field(default=2, metadata={"help": "DataLoader workers for --augment dataloader"})
    eval_batch_size: int = field(default=1024, metadata={"help": "images per evaluation batch"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    seed: int = field(default=0, metadata={"help": "seed for weights, shuffling and augmentation"})
    log_every: int = field(default=10, metadata={"help": "steps between host synchronisations for logging"})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.arch not in list_models():
            raise ConfigError(f"unknown architecture {self.arch!r}; valid: {', '.join(list_models())}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        for name in ("epochs", "batch_size", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not (self.max_lr > 0 and math.isfinite(self.max_lr)):
            raise ConfigError(f"max-lr must be a positive number, got {self.max_lr}")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"ema must be in [0, 1) (0: off), got {self.ema}")
        if not 0 < self.pct_start < 1:
            raise ConfigError(f"pct-start must lie in (0, 1), got {self.pct_start}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label-smoothing must lie in [0, 1), got {self.label_smoothing}")
        if not (self.logit_scale > 0 and math.isfinite(self.logit_scale)):
            raise ConfigError(f"logit-scale must be a positive number, got {self.logit_scale}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {self.activation!r}; valid: {', '.join(ACTIVATIONS)}")
        if self.ghost_batch < 0:
            raise ConfigError(f"ghost-batch must be >= 0 (0: off), got {self.ghost_batch}")
        if self.bn_scale not in ("learned", "frozen"):
            raise ConfigError(f"bn-scale must be learned or frozen, got {self.bn_scale!r}")
        if not (self.bias_lr_scale > 0 and math.isfinite(self.bias_lr_scale)):
            raise ConfigError(f"bias-lr-scale must be a positive number, got {self.bias_lr_scale}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight-decay must be >= 0, got {self.weight_decay}")
        if self.div_factor <= 0 or self.final_div_factor <= 0:
            raise ConfigError("div-factor and final-div-factor must be positive")
        if self.anneal_strategy not in ("linear", "cos"):
            raise ConfigError(f"unknown anneal strategy {self.anneal_strategy!r}; valid: linear, cos")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"unknown precision {self.precision!r}; valid: auto, bf16, fp32")
        if self.channels_last not in ("auto", "on", "off"):
            raise ConfigError(f"channels-last must be auto, on or off, got {self.channels_last!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"unknown compile mode {self.compile_mode!r}; valid: {', '.join(COMPILE_MODES)}")
        if self.compile_mode != "default" and not self.compile:
            raise ConfigError(f"compile-mode {self.compile_mode} takes effect only with --compile; add --compile, "
                              "or leave --compile-mode out to train eagerly")
        if self.augment not in ("batched", "dataloader"):
            raise ConfigError(f"unknown augmentation path {self.augment!r}; valid: batched, dataloader")
        if self.alternate_flip and self.augment != "batched":
            raise ConfigError("alternate-flip needs --augment batched (the seed's DataLoader path flips at random)")
        if not 0 <= self.crop_pad <= 8:
            raise ConfigError(f"crop-pad must lie in [0, 8] pixels, got {self.crop_pad}")
        if not 0 <= self.cutout < 32 or not 0 <= self.cutout_p <= 1:
            raise ConfigError("cutout must lie in [0, 32) pixels and cutout-p in [0, 1]")
        if self.loader_workers < 0:
            raise ConfigError(f"loader-workers must be >= 0, got {self.loader_workers}")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# Settings that change no number a run computes: a run may resume with another value, or from a checkpoint
# written before the setting existed.
RESULT_NEUTRAL = frozenset({"retain_memory"})

# What a recipe setting's value was before it became a setting: a config stored without it ran with that value.
FORMER_DEFAULTS = {"activation": "relu", "ghost_batch": 0, "alternate_flip": False, "crop_pad": 4}


def train_argv(stored: dict) -> list[str]:
    """The ``studies.train`` flags that rebuild a stored config (every ``TrainConfig`` field is a flag named after
    it): each field that differs from today's default, a field the config predates at its former value. The seed
    is left out; so are fields this release no longer has, and the bias LR scale of an Adam or AdamW config
    (which it does not use)."""
    import shlex

    values = {**FORMER_DEFAULTS, **stored}
    argv: list[str] = []
    for f in fields(TrainConfig):
        if f.name == "seed" or f.name not in values or values[f.name] == f.default:
            continue
        if f.name == "bias_lr_scale" and values.get("optimizer", "sgd") != "sgd":
            continue  # Adam and AdamW train every parameter at one LR, and studies.train refuses the flag with them
        flag, value = "--" + f.name.replace("_", "-"), values[f.name]
        if isinstance(f.default, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, shlex.quote(format(value, ".6g") if isinstance(value, float) else str(value))]
    return argv


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float  # the training objective (with label smoothing)
    train_accuracy: float
    val_loss: float  # plain cross-entropy on the validation split
    val_accuracy: float
    lr: float  # learning rate at the end of the epoch
    epoch_seconds: float  # training + evaluation
    train_seconds: float
    data_seconds: float  # of train_seconds: augmentation and batching (host clock; see Timer for CUDA)
    eval_seconds: float
    images_per_second: float  # training images / train_seconds (less compile time in epoch 1)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    predictions: np.ndarray
    tta: bool = False
    views: str = "none"  # which test-time augmentation: one of TTA_VIEWS


@dataclass
class FitResult:
    config: TrainConfig
    records: list[EpochRecord]
    model: nn.Module
    device: str
    precision: str
    channels_last: bool
    normalization: Normalization
    stopped_early: bool = False
    speed_source: str = ""  # why this precision and memory format: flags, a stored measurement or the rule
    compile_seconds: float | None = None  # the first step of each session that compiled (a resume compiles again)
    wall_seconds: float = 0.0
    test: EvalResult | None = None
    test_tta: EvalResult | None = None


# Called with (epoch, step, steps_per_epoch, mean train loss so far, train accuracy so far).
StepCallback = Callable[[int, int, int, float, float], None]
# Called after each epoch; returning True stops the run (a pruner uses this).
EpochCallback = Callable[[EpochRecord], "bool | None"]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - albumentations' per-sample path draws from numpy's global state
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def recipe_model(config: TrainConfig, num_classes: int) -> nn.Module:
    """The architecture with the recipe's layers (activation, ghost batch norm, frozen scales), on the CPU.

    What ``studies.train`` prints as the layer table; ``build_model`` adds the execution choices to it.
    """
    model = create_model(config.arch, num_classes=num_classes)
    use_activation(model, config.activation)
    if config.ghost_batch:
        use_ghost_batch_norm(model, config.ghost_batch)
    if config.bn_scale == "frozen":
        freeze_bn_scales(model)
    return model


def use_recipe_convs(model: nn.Module, config: TrainConfig, *, matmul_convs: bool | None = None,
                     winograd: bool | None = None) -> nn.Module:
    """``model`` with the CPU conv kernels ``config`` trains with (GEMMs on small maps, Winograd in fp32).

    Each conv picks its kernel per call, from the input's device, dtype and size, so this changes no parameter,
    no state-dict key and nothing on CUDA; ``matmul_convs`` / ``winograd`` override the config's choices.
    """
    gemm = config.matmul_convs if matmul_convs is None else matmul_convs
    wino = config.winograd if winograd is None else winograd
    if gemm or wino:
        use_matmul_convs(model, max_pixels=DEFAULT_MAX_PIXELS if gemm else 0,
                         winograd_min_channels=DEFAULT_MIN_CHANNELS if wino else 0)
    return model


def build_model(config: TrainConfig, splits: DataSplits, norm: Normalization, device: torch.device,
                channels_last: bool, *, generator: torch.Generator | None = None,
                matmul_convs: bool | None = None, winograd: bool | None = None) -> nn.Module:
    """The model ``config`` trains, as training, the LR range test and the benchmark all build it."""
    model = use_recipe_convs(recipe_model(config, splits.num_classes).to(device), config,
                             matmul_convs=matmul_convs, winograd=winograd)
    if config.whiten:
        whiten_first_conv(model, splits.train_images, norm, generator=generator)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def freeze_bn_scales(model: nn.Module) -> int:
    """Fix every batch norm's scale at 1 (not learnt): Page's "frozen batch-norm scales". Returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
            with torch.no_grad():
                module.weight.fill_(1.0)
            module.weight.requires_grad_(False)
            count += 1
    return count


def build_optimizer(config: TrainConfig, model: nn.Module, fused: bool | None = None) -> torch.optim.Optimizer:
    """SGD (Nesterov), Adam or AdamW over the trainable parameters; ``fused`` by default where torch has it."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    groups: list[dict] = [{"params": params, "lr_scale": 1.0}]
    if config.bias_lr_scale != 1.0 and config.optimizer == "sgd":
        # Page's recipe: batch-norm shifts learn 64x faster with 64x less weight decay than the weights.
        biases = [p for n, p in named if n.endswith("bias")]
        groups = [{"params": [p for n, p in named if not n.endswith("bias")], "lr_scale": 1.0},
                  {"params": biases, "lr_scale": config.bias_lr_scale,
                   "weight_decay": config.weight_decay / config.bias_lr_scale}]
        groups = [g for g in groups if g["params"]]
    for g in groups:
        g["lr"] = config.max_lr * g["lr_scale"]
    # One fused kernel per step instead of several passes per tensor: about 5x less optimizer time on the CPU
    # (SGD and AdamW over 7M parameters: 115-190 ms -> 23 ms here), and fewer launches on CUDA.
    if fused is None:
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.max_lr, momentum=config.momentum, nesterov=True,
                               weight_decay=config.weight_decay, fused=fused)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.max_lr, betas=(config.momentum, 0.999),
                                weight_decay=config.weight_decay, fused=fused)
    return torch.optim.AdamW(groups, lr=config.max_lr, betas=(config.momentum, 0.999),
                             weight_decay=config.weight_decay, fused=fused)


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    # OneCycleLR divides by the length of each phase, and its warm-up phase is pct_start * total_steps - 1 steps
    # long: exactly one warm-up step (4 steps at pct-start 0.25) raised ZeroDivisionError from inside torch.
    warmup = config.pct_start * total_steps
    if math.isclose(warmup, 1.0) or (config.three_phase and math.isclose(total_steps + 1, 2 * warmup)):
        raise ConfigError(
            f"pct-start {config.pct_start:g} of {total_steps} steps ({config.epochs} "
            f"epoch{'s' if config.epochs != 1 else ''}) is a one-step warm-up, which torch's OneCycleLR cannot "
            "schedule; change --pct-start, --epochs or --batch-size")
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[config.max_lr * g.get("lr_scale", 1.0) for g in optimizer.param_groups],
        total_steps=total_steps,
        pct_start=config.pct_start,
        anneal_strategy=config.anneal_strategy,
        cycle_momentum=config.cycle_momentum,
        base_momentum=0.85,
        max_momentum=0.95,
        div_factor=config.div_factor,
        final_div_factor=config.final_div_factor,
        three_phase=config.three_phase,
    )


class WeightEMA:
    """Exponential moving average of a model's weights and buffers (BN statistics), kept on the model's device.

    torch's ``AveragedModel`` reads its update counter on the host at every update (``n_averaged == 0``), which
    is a device synchronisation per step on CUDA; this copy starts equal to the model and needs no counter.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0  # a host-side count: reading it costs no synchronisation
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)

    def current_decay(self) -> float:
        """``decay``, ramped up over the first updates: (1 + n) / (10 + n) until it reaches ``decay``.

        A full decay from step one would keep a run of a few dozen steps (a study's short trials) close to
        its random initial weights; the ramp makes the average follow the model early and smooth it later.
        """
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        self.updates += 1
        ours = [*self.module.parameters(), *self.module.buffers()]
        theirs = [*model.parameters(), *model.buffers()]
        floats = [(a, b) for a, b in zip(ours, theirs, strict=True) if a.is_floating_point()]
        torch._foreach_lerp_([a for a, _ in floats], [b.detach() for _, b in floats], 1.0 - decay)
        for a, b in zip(ours, theirs, strict=True):
            if not a.is_floating_point():  # BN's batch counter: follow the model
                a.copy_(b)


def _train_batches(config: TrainConfig, splits: DataSplits, norm: Normalization, device: torch.device,
                   channels_last: bool, gen: torch.Generator):
    """(number of steps per epoch, a function that yields one epoch of batches less the first ``skip``, the batched
    augmenter or None)."""
    aug = AugmentConfig(pad=config.crop_pad, cutout=config.cutout, cutout_p=config.cutout_p,
                        alternate_flip=config.alternate_flip)
    n = len(splits.train_labels)
    if config.augment == "batched":
        augmenter = BatchAugmenter(splits.train_images, splits.train_labels, norm, device, aug, channels_last)
        return (augmenter.num_batches(config.batch_size),
                lambda skip=0: augmenter.epoch(config.batch_size, gen, skip=skip), augmenter)

    from cifarlab.augment import AlbumentationsDataset, reseed_worker, seed_pipeline

    dataset = AlbumentationsDataset(splits.train_images, splits.train_labels, seed_pipeline(norm, aug))
    sampler = _SkippingSampler(torch.utils.data.RandomSampler(dataset, generator=gen))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.batch_size, sampler=sampler, drop_last=n >= config.batch_size,
        num_workers=config.loader_workers, generator=gen, pin_memory=device.type == "cuda",
        persistent_workers=config.loader_workers > 0, worker_init_fn=reseed_worker,
    )
    steps = len(loader)

    def epoch(skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler.skip = skip * config.batch_size  # the epoch's shuffle as drawn, less the batches already trained
        try:
            for x, y in loader:
                x = x.to(device, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                yield x, y.to(device, non_blocking=True)
        finally:
            sampler.skip = 0

    return steps, epoch, None


class _SkippingSampler(torch.utils.data.Sampler[int]):
    """``inner``'s order less its first ``skip`` indices: a run resumed within an epoch on the DataLoader path
    draws the epoch's shuffle as before (the same random numbers in the same order) and loads only the batches
    it has not trained on."""

    def __init__(self, inner: torch.utils.data.Sampler[int]) -> None:
        self.inner, self.skip = inner, 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.inner), self.skip, None)

    def __len__(self) -> int:
        return len(self.inner) - self.skip


# Test-time augmentation: the views whose logits are averaged. "flip-shift" is airbench's second level: the image
# and its mirror weigh half, and the same pair moved by one pixel up-left and down-right (edges reflected) a
# quarter each; 6 forward passes against 2.
TTA_VIEWS = {"none": 1, "flip": 2, "flip-shift": 6}  # each view set and its forward passes per image


def _flip_logits(model: nn.Module, x: torch.Tensor, logit_scale: float) -> torch.Tensor:
    return 0.5 * (model(x).float() * logit_scale + model(x.flip(3)).float() * logit_scale)


def _shifted(x: torch.Tensor, dy: int, dx: int, channels_last: bool) -> torch.Tensor:
    """``x`` moved by (dy, dx) pixels, the uncovered edge filled by reflection."""
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    h, w = x.shape[-2:]
    out = padded[:, :, 1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]
    return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


class EvaluationStopped(Exception):
    """``evaluate``'s ``stop`` said yes between two batches."""


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, norm: Normalization, *,
             device: torch.device, precision: str = "fp32", channels_last: bool = False,
             batch_size: int = 1024, tta: bool | str = False, logit_scale: float = 1.0,
             stop: Callable[[], bool] | None = None) -> EvalResult:
    """Loss and accuracy at inference speed: no autograd, the training precision, large batches.

    ``tta``: ``True`` or "flip" averages the logits of each image and its horizontal mirror; "flip-shift" adds
    the pair moved by a pixel each way (``TTA_VIEWS``); ``False`` or "none" evaluates the image alone. ``stop``,
    asked before each batch, ends the evaluation with ``EvaluationStopped`` when it returns True.
    """
    views = {False: "none", True: "flip"}.get(tta, tta) if isinstance(tta, bool) else tta
    if views not in TTA_VIEWS:
        raise ConfigError(f"unknown test-time augmentation {tta!r}; valid: {', '.join(TTA_VIEWS)}")
    if len(labels) == 0:
        raise ConfigError("cannot evaluate on an empty split")
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device)
    preds = []
    data = EvalBatches(images, labels, norm, device, channels_last)
    try:
        with torch.inference_mode(), autocast(device, precision):
            for x, y in data.batches(batch_size):
                if stop is not None and stop():
                    raise EvaluationStopped
                if views == "none":
                    logits = model(x).float() * logit_scale
                else:
                    logits = _flip_logits(model, x, logit_scale)
                if views == "flip-shift":
                    shifted = (_shifted(x, d, d, channels_last) for d in (-1, 1))
                    logits = 0.5 * logits + 0.25 * sum(_flip_logits(model, v, logit_scale) for v in shifted)
                loss_sum += F.cross_entropy(logits, y, reduction="sum")
                preds.append(logits.argmax(1))
    finally:
        model.train(was_training)
    pred = torch.cat(preds).cpu().numpy()
    return EvalResult(loss=float(loss_sum) / len(labels), accuracy=float((pred == labels).mean()),
                      predictions=pred, tta=views != "none", views=views)


WEIGHTS_FORMAT = 1  # bumped when what save_weights stores changes shape


def save_weights(result: FitResult, path: Path, classes: list[str] | tuple[str, ...]) -> Path:
    """Write the model a run evaluated (the EMA of the weights where the run kept one) to ``path``.

    Stored as a plain dict for ``torch.load(weights_only=True)``: the state dict in fp32 on the CPU, with the
    whitening parametrisation folded into the first conv's weight (so the keys are the architecture's own), the
    config that rebuilds the recipe's layers (activation, ghost batch norm), the class names and the input
    normalisation. ``load_weights`` gives the model back.
    """
    from torch.nn.utils import parametrize

    # Folded from the state dict, not by removing the parametrisation from a deep copy: the copy shares its
    # module's generated class, and removing it there deletes that class's ``weight`` property from under the
    # caller's model, which then fails on its next forward pass.
    state = result.model.state_dict()
    for prefix, module in result.model.named_modules():
        if parametrize.is_parametrized(module):
            dot = f"{prefix}." if prefix else ""
            for name in module.parametrizations:
                state = {k: v for k, v in state.items() if not k.startswith(f"{dot}parametrizations.{name}.")}
                with torch.no_grad():
                    state[f"{dot}{name}"] = getattr(module, name)
    state = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.cpu().contiguous()
             for k, v in state.items()}
    doc = {"format": WEIGHTS_FORMAT, "state_dict": state, "config": result.config.to_dict(), "classes": list(classes),
           "normalization": {"mean": list(result.normalization.mean), "std": list(result.normalization.std)}}
    with atomic_file(Path(path), "wb") as fh:
        torch.save(doc, fh)
    return Path(path)


def load_weights(path: Path) -> tuple[nn.Module, Normalization, dict]:
    """(model in eval mode on the CPU, its input normalisation, the stored document) from ``save_weights``' file.

    The model runs the conv kernels its run trained with (``use_recipe_convs``): a stored model evaluates at the
    speed, and with the arithmetic, of the evaluation at the end of its training.

    Feed it images as ``evaluate`` does: uint8 ``(N, 32, 32, 3)`` through the returned normalisation, or call
    ``evaluate(model, images, labels, norm, device=torch.device("cpu"))``.
    """
    import pickle

    try:
        doc = torch.load(Path(path), map_location="cpu", weights_only=True)
    except OSError as exc:
        raise ConfigError(f"cannot read weights from {path}: {exc.strerror or exc}") from None
    except (RuntimeError, EOFError, pickle.UnpicklingError):  # torch's messages run to paragraphs
        raise ConfigError(f"cannot read weights from {path}: not a torch file that holds only tensors") from None
    if not isinstance(doc, dict) or doc.get("format") != WEIGHTS_FORMAT:
        raise ConfigError(f"{path} is not a cifarlab weights file (format {WEIGHTS_FORMAT})")
    known = {f.name for f in fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in doc["config"].items() if k in known})
    model = use_recipe_convs(recipe_model(config, len(doc["classes"])), config)
    model.load_state_dict(doc["state_dict"])
    norm = Normalization(tuple(doc["normalization"]["mean"]), tuple(doc["normalization"]["std"]))
    return model.eval(), norm, doc


CHECKPOINT_FORMAT = 1  # bumped when what a checkpoint stores changes shape


@dataclass
class Checkpointing:
    """Where ``fit`` keeps the state to resume a run from, and how often.

    With ``every`` > 0 it saves at the end of the first step after ``every`` seconds have passed since the last
    save, within an epoch or at its end (a CPU epoch can last half an hour: a stop loses at most ``every`` and a
    step); with ``every`` = 0 at the end of every epoch; never after the last epoch. ``request_stop`` (a signal
    handler's call) makes ``fit`` save at the end of the step under way and raise ``KeyboardInterrupt``.
    ``extra`` is stored along (the CLI keeps its flags there); ``resume`` is a checkpoint read by
    ``load_checkpoint`` to continue.
    """

    path: Path
    every: float = 60.0
    extra: dict = field(default_factory=dict)
    resume: dict | None = None
    saved_epoch: int = 0  # the epochs the file holds whole, once ``fit`` has saved it or resumed from it
    saved_step: int = 0  # and the steps of the next epoch it holds
    steps_per_epoch: int = 0
    stop_requested: bool = False

    def request_stop(self) -> None:
        self.stop_requested = True

    def describe(self) -> str:
        """Where the file leaves the run: "epoch 3" or "epoch 4, step 40 of 97"."""
        if self.saved_step:
            return f"epoch {self.saved_epoch + 1}, step {self.saved_step} of {self.steps_per_epoch}"
        return f"epoch {self.saved_epoch}"


def checkpoint_progress(doc: dict) -> tuple[int, int, int]:
    """(whole epochs, steps of the next epoch, steps an epoch) a checkpoint holds; one saved before saves within an
    epoch holds whole epochs."""
    return int(doc["epoch"]), int(doc.get("step", 0)), int(doc.get("steps_per_epoch", 0))


def load_checkpoint(path: Path, *, lazy: bool = False) -> dict:
    """A checkpoint written by ``fit``; a file that is not one is refused in one line. ``lazy`` maps the file
    instead of reading it: the tensors are read only when used (the reports read a checkpoint's progress)."""
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True, mmap=lazy)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no checkpoint there (a run keeps one while it trains, see --checkpoint-every)") \
            from None
    except Exception as exc:  # torch raises pickle, zip and runtime errors for a file that is not a checkpoint
        raise ConfigError(f"{path} is not a cifarlab checkpoint ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or doc.get("kind") != "cifarlab-checkpoint" or doc.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not a cifarlab checkpoint (format {CHECKPOINT_FORMAT})")
    return doc


@dataclass
class _EpochStart:
    """What a save within an epoch needs from its start: the generator and mirrors the epoch's draws came from
    (a resumed run draws them again and skips the steps done) and the running sums of its record."""

    generator: torch.Tensor
    flip_now: torch.Tensor | None
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    data_seconds: float = 0.0
    train_seconds: float = 0.0  # of this epoch, in the sessions before a resume
    compile_seconds: float = 0.0  # of train_seconds: compiling (each session compiles on its first step)


def _save_checkpoint(ckpt: Checkpointing, *, config: TrainConfig, epoch: int, model: nn.Module,
                     optimizer: torch.optim.Optimizer, scheduler, ema: WeightEMA | None, gen: torch.Generator,
                     augmenter: BatchAugmenter | None, result: FitResult, wall_seconds: float, step: int = 0,
                     within: _EpochStart | None = None) -> None:
    """Save the run after ``epoch`` whole epochs and ``step`` steps of the next (``within`` then holds that
    epoch's start and running sums)."""
    if step:
        assert within is not None
        generator, flip = within.generator, within.flip_now
    else:
        generator, flip = gen.get_state(), None if augmenter is None else augmenter.flip_now
    state = {
        "kind": "cifarlab-checkpoint", "format": CHECKPOINT_FORMAT, "config": config.to_dict(), "epoch": epoch,
        "step": step, "steps_per_epoch": ckpt.steps_per_epoch, "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "ema": None if ema is None else {"module": ema.module.state_dict(), "updates": ema.updates},
        "generator": generator, "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "flip_now": None if flip is None else flip.cpu(),
        "within": None if not step else {k: v for k, v in asdict(within).items() if k not in ("generator", "flip_now")},
        "records": [r.to_dict() for r in result.records], "compile_seconds": result.compile_seconds,
        "wall_seconds": wall_seconds, "extra": ckpt.extra,
    }
    with atomic_file(ckpt.path, "wb") as fh:
        torch.save(state, fh)
    ckpt.saved_epoch, ckpt.saved_step = epoch, step


def _restore(doc: dict, config: TrainConfig, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
             ema: WeightEMA | None, gen: torch.Generator, augmenter: BatchAugmenter | None, result: FitResult,
             device: torch.device) -> tuple[int, int, dict, float]:
    """Put the run back where ``doc`` left it; returns (the next epoch, the steps of it already done, that
    epoch's running sums, wall seconds already spent)."""
    stored, now = ({k: v for k, v in c.items() if k not in RESULT_NEUTRAL} for c in (doc["config"], config.to_dict()))
    if stored != now:
        changed = sorted(k for k in set(stored) | set(now) if stored.get(k) != now.get(k))
        raise ConfigError(f"the checkpoint was written with other settings ({', '.join(changed)})")
    if (doc["ema"] is None) != (ema is None):
        raise ConfigError("the checkpoint's EMA setting differs from the run's")
    model.load_state_dict(doc["model"])
    optimizer.load_state_dict(doc["optimizer"])
    scheduler.load_state_dict(doc["scheduler"])
    if ema is not None:
        ema.module.load_state_dict(doc["ema"]["module"])
        ema.updates = int(doc["ema"]["updates"])
    gen.set_state(doc["generator"])
    torch.set_rng_state(doc["torch_rng"])
    if doc["cuda_rng"] and device.type == "cuda" and len(doc["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(doc["cuda_rng"])
    if augmenter is not None:
        augmenter.load_flip_state(doc["flip_now"])
    result.records = [EpochRecord(**r) for r in doc["records"]]
    result.compile_seconds = doc["compile_seconds"]
    epoch, step, _ = checkpoint_progress(doc)
    within = dict(doc.get("within") or {}) if step else {}
    if step and "compile_seconds" not in within:  # written before the field: a first session compiled in epoch 1
        within["compile_seconds"] = (doc["compile_seconds"] or 0.0) if epoch == 0 else 0.0
    return epoch + 1, step, within, float(doc["wall_seconds"])


_NO_VALIDATION = EvalResult(loss=float("nan"), accuracy=float("nan"), predictions=np.empty(0, np.int64), tta=False)


def fit(
    config: TrainConfig,
    splits: DataSplits,
    *,
    on_epoch: EpochCallback | None = None,
    on_step: StepCallback | None = None,
    test: bool = False,
    test_tta: bool = False,
    checkpoint: Checkpointing | None = None,
) -> FitResult:
    """Train ``config.arch`` on ``splits.train`` with the one-cycle policy; validate after every epoch.

    The test split is evaluated only when ``test`` (and/or ``test_tta``) is asked for, after training. With
    ``checkpoint`` the state to resume from is saved at epoch ends (``Checkpointing``), and a run given one to
    resume continues after its last epoch: on the batched path with the same random numbers as a run that was
    never stopped, so the same results on the CPU. On the CPU, freed memory stays in the process while it
    trains (``config.retain_memory``; ``cifarlab.hostmem``).
    """
    device = resolve_device(config.device)
    with retained_memory(config.retain_memory and device.type == "cpu"):
        return _fit(config, splits, device, on_epoch=on_epoch, on_step=on_step, test=test, test_tta=test_tta,
                    checkpoint=checkpoint)


def _fit(config: TrainConfig, splits: DataSplits, device: torch.device, *, on_epoch: EpochCallback | None,
         on_step: StepCallback | None, test: bool, test_tta: bool, checkpoint: Checkpointing | None) -> FitResult:
    # Flags first, then what bench.devices --choose measured for this architecture on this device, then a rule.
    speed = resolve_speed(config.arch, device, config.precision, config.channels_last)
    precision, channels_last = speed.precision, speed.channels_last
    configure_device(device)  # CUDA: cudnn.benchmark (fixed shapes) and TF32
    gen = seed_everything(config.seed)
    wall_start = time.perf_counter()

    norm = Normalization.from_images(splits.train_images)
    model = build_model(config, splits, norm, device, channels_last, generator=gen)
    # Chance-level cross-entropy is ln(classes); a mean loss ten times that has left any useful basin even when
    # it is still finite (weights blown up by a huge LR stay finite in fp32 for a while).
    diverged_above = 10 * math.log(max(splits.num_classes, 2))
    train_model: nn.Module = torch.compile(model, mode=config.compile_mode) if config.compile else model

    steps_per_epoch, epoch_batches, augmenter = _train_batches(config, splits, norm, device, channels_last, gen)
    optimizer = build_optimizer(config, model)
    total_steps = config.epochs * steps_per_epoch
    scheduler = build_scheduler(config, optimizer, total_steps)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    # EMA of the weights: a smoother model than the last step's, which short schedules benefit from.
    ema_model = WeightEMA(model, config.ema) if config.ema else None
    eval_model = ema_model.module if ema_model is not None else model
    result = FitResult(config=config, records=[], model=eval_model, device=str(device), precision=precision,
                       channels_last=channels_last, normalization=norm, speed_source=speed.source)
    first_epoch, first_step, sums, wall_before = 1, 0, {}, 0.0
    if checkpoint is not None:
        checkpoint.steps_per_epoch = steps_per_epoch
        if checkpoint.resume is not None:
            first_epoch, first_step, sums, wall_before = _restore(
                checkpoint.resume, config, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema_model,
                gen=gen, augmenter=augmenter, result=result, device=device)
            checkpoint.saved_epoch, checkpoint.saved_step = first_epoch - 1, first_step
    last_save = time.monotonic()

    def save(epoch: int, step: int = 0, within: _EpochStart | None = None) -> None:
        nonlocal last_save
        assert checkpoint is not None
        _save_checkpoint(checkpoint, config=config, epoch=epoch, model=model, optimizer=optimizer,
                         scheduler=scheduler, ema=ema_model, gen=gen, augmenter=augmenter, result=result,
                         wall_seconds=wall_before + time.perf_counter() - wall_start, step=step, within=within)
        last_save = time.monotonic()

    compiling = config.compile  # the first step of every session compiles, a resumed one's again
    for epoch in range(first_epoch, config.epochs + 1):
        model.train()
        skip = first_step if epoch == first_epoch else 0  # steps of this epoch done before a resume
        before = _EpochStart(gen.get_state(), None if augmenter is None else augmenter.flip_now,
                             **(sums if skip else {}))
        loss_sum = torch.full((), before.loss_sum, device=device)
        correct = torch.full((), before.correct, device=device, dtype=torch.long)
        seen = before.seen
        data_seconds = before.data_seconds
        epoch_compile_seconds = before.compile_seconds
        with Timer(device) as train_timer:
            batches = epoch_batches(skip)
            step = skip
            while True:
                t_data = time.perf_counter()
                try:
                    x, y = next(batches)
                except StopIteration:
                    break
                data_seconds += time.perf_counter() - t_data
                step += 1
                t_step = time.perf_counter()
                with autocast(device, precision):
                    logits = train_model(x)
                    logits = logits.float() * config.logit_scale
                    loss = criterion(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if ema_model is not None:
                    ema_model.update(model)
                if scheduler.last_epoch < total_steps - 1:  # no step past the end: OneCycleLR would extrapolate
                    scheduler.step()
                if compiling:  # reported apart and left out of the epoch's speed
                    synchronize(device)
                    took = time.perf_counter() - t_step
                    result.compile_seconds = (result.compile_seconds or 0.0) + took
                    epoch_compile_seconds += took
                    compiling = False
                # Accumulate on the device; read back only at logging points.
                loss_sum += loss.detach() * len(y)
                correct += (logits.argmax(1) == y).sum()
                seen += len(y)
                if step % config.log_every == 0 or step == steps_per_epoch:
                    mean_loss = float(loss_sum) / seen  # host sync
                    if not math.isfinite(mean_loss) or mean_loss > diverged_above:
                        raise TrainingDiverged(
                            f"training loss became {mean_loss:.4g} at epoch {epoch}, step {step} "
                            f"(max LR {config.max_lr:g}, {config.optimizer})", epoch, step)
                    if on_step is not None:
                        on_step(epoch, step, steps_per_epoch, mean_loss, float(correct) / seen)
                faults.point("step")
                if checkpoint is not None and (checkpoint.stop_requested or (
                        checkpoint.every > 0 and step < steps_per_epoch
                        and time.monotonic() - last_save >= checkpoint.every)):
                    # Within the epoch: the sums so far and the epoch's start, to draw its batches again.
                    save(epoch - 1, step, _EpochStart(
                        before.generator, before.flip_now, float(loss_sum), int(correct), seen, data_seconds,
                        before.train_seconds + train_timer.elapsed(), epoch_compile_seconds))
                    if checkpoint.stop_requested:
                        raise KeyboardInterrupt
        train_seconds = before.train_seconds + train_timer.seconds
        train_loss = float(loss_sum) / max(seen, 1)
        if not math.isfinite(train_loss):
            raise TrainingDiverged(f"training loss became {train_loss} at epoch {epoch}", epoch, step)
        compute_seconds = train_seconds - epoch_compile_seconds
        with Timer(device) as eval_timer:
            # An empty validation split (``val_size=0``) trains on everything and reports NaN here.
            val = evaluate(eval_model, splits.val_images, splits.val_labels, norm, device=device,
                           precision=precision, channels_last=channels_last, batch_size=config.eval_batch_size,
                           logit_scale=config.logit_scale) if len(splits.val_labels) else _NO_VALIDATION
        record = EpochRecord(
            epoch=epoch,
            train_loss=train_loss,
            train_accuracy=float(correct) / max(seen, 1),
            val_loss=val.loss,
            val_accuracy=val.accuracy,
            lr=scheduler.get_last_lr()[0],
            epoch_seconds=train_seconds + eval_timer.seconds,
            train_seconds=train_seconds,
            data_seconds=data_seconds,
            eval_seconds=eval_timer.seconds,
            # The first step of a compiled model's session is mostly compilation: reported apart, not as speed.
            images_per_second=seen / compute_seconds if compute_seconds > 0 else float("nan"),
        )
        result.records.append(record)
        if on_epoch is not None and on_epoch(record):
            result.stopped_early = True
            break
        if checkpoint is not None and epoch < config.epochs and (
                checkpoint.stop_requested or time.monotonic() - last_save >= checkpoint.every):
            save(epoch)
            if checkpoint.stop_requested:  # asked during the evaluation: the epoch is whole, stop here
                raise KeyboardInterrupt

    kw = {"device": device, "precision": precision, "channels_last": channels_last,
          "batch_size": config.eval_batch_size, "logit_scale": config.logit_scale}
    if checkpoint is not None:  # a stop asked for after the last step: the training is whole, and saved whole
        kw["stop"] = lambda: checkpoint.stop_requested
    try:  # a stop asked during the last epoch's validation is seen before the first test batch
        if test:
            result.test = evaluate(eval_model, splits.test_images, splits.test_labels, norm, **kw)
        if test_tta:
            result.test_tta = evaluate(eval_model, splits.test_images, splits.test_labels, norm, tta=True, **kw)
    except EvaluationStopped:
        save(len(result.records))  # every epoch done: a resumed run only evaluates the test split
        raise KeyboardInterrupt from None
    result.wall_seconds = wall_before + time.perf_counter() - wall_start
    return result

