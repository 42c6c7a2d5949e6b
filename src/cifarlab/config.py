"""``TrainConfig``: the one source of training flags and defaults (every field is a ``studies.train`` flag)."""

from __future__ import annotations

import math
import shlex
from dataclasses import asdict, dataclass, field, fields

from cifarlab.errors import ConfigError
from cifarlab.models import list_models
from cifarlab.models.layers import ACTIVATIONS

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
    retain_memory: bool = field(default=True, metadata={
        "help": "on the CPU, keep freed memory in the process instead of page-faulting it back every step "
                "(glibc's malloc); changes no result"})
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


def train_argv(stored: dict) -> list[str]:
    """The ``studies.train`` flags that rebuild a stored config: each field that differs from today's default
    (every ``TrainConfig`` field is a flag named after it). The seed is left out, and so is the bias LR scale of
    an Adam or AdamW config, which it does not use and studies.train refuses."""
    argv: list[str] = []
    for f in fields(TrainConfig):
        if f.name == "seed" or f.name not in stored or stored[f.name] == f.default:
            continue
        if f.name == "bias_lr_scale" and stored.get("optimizer", "sgd") != "sgd":
            continue
        flag, value = "--" + f.name.replace("_", "-"), stored[f.name]
        if isinstance(f.default, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, shlex.quote(format(value, ".6g") if isinstance(value, float) else str(value))]
    return argv
