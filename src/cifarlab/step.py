"""One training step, written once: ``fit()``, ``bench.devices`` and the LR range test all run ``TrainStep``
(forward under autocast, scaled logits, label-smoothed loss, backward, fused optimizer, EMA, scheduler)."""

from __future__ import annotations

import contextlib
import copy
import math
import time

import numpy as np
import torch
from torch import nn

from cifarlab.config import TrainConfig
from cifarlab.errors import ConfigError, TrainingDiverged
from cifarlab.keep import memo
from cifarlab.timing import synchronize


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


class TrainStep:
    """The recipe's training step over ``model``: ``step(x, y)`` returns the loss and the scaled logits.
    ``schedule=False`` leaves the LR to the caller (the LR range test). A compiled model's first call compiles: its
    seconds add to ``compile_seconds``, apart from the training speed."""

    def __init__(self, config: TrainConfig, model: nn.Module, device: torch.device, precision: str, *,
                 total_steps: int, num_classes: int, fused: bool | None = None, schedule: bool = True) -> None:
        self.config, self.model, self.device, self.precision = config, model, device, precision
        # Static shapes: one graph per batch size, each compiled once per process and kept with its model.
        self.forward = memo("compiled forward", (model, config.compile_mode), lambda: torch.compile(
            model, mode=config.compile_mode, dynamic=False)) if config.compile else model
        self.optimizer = build_optimizer(config, model, fused=fused)
        self.total_steps = total_steps
        self.scheduler = build_scheduler(config, self.optimizer, total_steps) if schedule else None
        self.ema = WeightEMA(model, config.ema) if config.ema else None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        # Chance-level cross-entropy is ln(classes); a mean loss ten times that has left any useful basin even
        # while finite (weights blown up by a huge LR stay finite in fp32 for a while).
        self.diverged_above = 10 * math.log(max(num_classes, 2))
        self.compiling, self.compile_seconds = config.compile, 0.0

    @property
    def eval_model(self) -> nn.Module:
        """What is validated and tested: the EMA of the weights where the recipe keeps one."""
        return self.model if self.ema is None else self.ema.module

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        started = time.perf_counter()
        with autocast(self.device, self.precision):
            logits = self.forward(x).float() * self.config.logit_scale
            loss = self.criterion(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        if self.scheduler is not None and self.scheduler.last_epoch < self.total_steps - 1:
            self.scheduler.step()  # never past the end: OneCycleLR would extrapolate
        if self.compiling:
            synchronize(self.device)
            self.compile_seconds += time.perf_counter() - started
            self.compiling = False
        return loss.detach(), logits.detach()

    def check(self, mean_loss: float, epoch: int, step: int) -> None:
        """Raise ``TrainingDiverged`` where the mean training loss so far is no longer finite or far above chance."""
        if not math.isfinite(mean_loss) or mean_loss > self.diverged_above:
            raise TrainingDiverged(f"training loss became {mean_loss:.4g} at epoch {epoch}, step {step} "
                                   f"(max LR {self.config.max_lr:g}, {self.config.optimizer})", epoch, step)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                "ema": None if self.ema is None else {"module": self.ema.module.state_dict(),
                                                      "updates": self.ema.updates}}

    def load_state_dict(self, doc: dict) -> None:
        if (doc["ema"] is None) != (self.ema is None):
            raise ConfigError("the checkpoint's EMA setting differs from the run's")
        self.model.load_state_dict(doc["model"])
        self.optimizer.load_state_dict(doc["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(doc["scheduler"])
        if self.ema is not None:
            self.ema.module.load_state_dict(doc["ema"]["module"])
            self.ema.updates = int(doc["ema"]["updates"])


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
    # One fused kernel per step instead of several passes per tensor: less optimizer time on the CPU, fewer
    # launches on CUDA.
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
        optimizer, max_lr=[config.max_lr * g.get("lr_scale", 1.0) for g in optimizer.param_groups],
        total_steps=total_steps, pct_start=config.pct_start, anneal_strategy=config.anneal_strategy,
        cycle_momentum=config.cycle_momentum, base_momentum=0.85, max_momentum=0.95, div_factor=config.div_factor,
        final_div_factor=config.final_div_factor, three_phase=config.three_phase)


class WeightEMA:
    """Exponential moving average of a model's weights and buffers, on the model's device. torch's ``AveragedModel``
    reads its counter on the host every update, a synchronisation per step on CUDA; this one needs no counter."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0  # a host-side count: reading it costs no synchronisation
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)

    def current_decay(self) -> float:
        """``decay`` ramped up as (1 + n) / (10 + n): a short run's average follows the model, a long one smooths it."""
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
