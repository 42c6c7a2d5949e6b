"""LR range test (Smith 2015, as fastai and torch-lr-finder run it), the way the seeds chose LRMIN/LRMAX: the LR
grows exponentially over the steps, the loss is smoothed (bias-corrected) and the sweep stops once it exceeds
``diverge_factor`` times its best; model and optimizer are restored afterwards."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

from cifarlab.config import TrainConfig
from cifarlab.errors import ConfigError
from cifarlab.step import TrainStep


@dataclass
class LRFindResult:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestions: dict[str, float]  # name -> learning rate
    diverged: bool
    start_lr: float
    end_lr: float
    num_steps: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def suggest(lrs: np.ndarray, smoothed: np.ndarray, skip_start: int = 10, skip_end: int = 5) -> dict[str, float]:
    """Two suggestions for the peak LR.

    ``steepest``: where the smoothed loss falls fastest per decade of LR (torch-lr-finder's choice).
    ``min_div_10``: a tenth of the LR at the lowest smoothed loss (fastai's classic rule).
    """
    lrs, smoothed = np.asarray(lrs, dtype=float), np.asarray(smoothed, dtype=float)
    if len(lrs) < 3:
        raise ConfigError("the LR range test needs at least 3 steps to suggest a learning rate")
    out: dict[str, float] = {"min_div_10": float(lrs[int(np.argmin(smoothed))] / 10.0)}
    # The steepest descent is searched only up to the lowest loss: past it the curve is the divergence, whose
    # recoveries would otherwise pass for descents.
    end = int(np.argmin(smoothed)) + 1
    lo, hi = (skip_start, min(end, len(lrs) - skip_end)) if end > skip_start + 2 else (0, max(end, 3))
    grad = np.gradient(smoothed[lo:hi], np.log10(lrs[lo:hi]))
    out["steepest"] = float(lrs[lo + int(np.argmin(grad))])
    return out


def lr_range_test(step: TrainStep, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], *, start_lr: float = 1e-7,
                  end_lr: float = 10.0, num_steps: int = 100, smoothing: float = 0.98, diverge_factor: float = 4.0,
                  on_step: Callable[[int, float, float], None] | None = None) -> LRFindResult:
    """Sweep ``step`` (the training step, built with ``schedule=False``) over rising learning rates.

    ``on_step(step, lr, smoothed_loss)`` is called after each step, counted from 1 (a progress display)."""
    if not 0 < start_lr < end_lr:
        raise ConfigError(f"need 0 < start-lr < end-lr, got {start_lr} and {end_lr}")
    if num_steps < 3:
        raise ConfigError(f"the LR range test needs at least 3 steps, got {num_steps}")
    saved = copy.deepcopy(step.state_dict())
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    diverged = False
    avg, best = 0.0, math.inf
    gamma = (end_lr / start_lr) ** (1.0 / (num_steps - 1))
    try:
        step.model.train()
        for n in range(num_steps):
            lr = start_lr * gamma**n
            for group in step.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # a group's fixed multiple (--bias-lr-scale)
            value = float(step(*next(batches))[0])
            lrs.append(lr)
            losses.append(value)
            if not math.isfinite(value):
                diverged = True
                smoothed.append(math.inf)
                break
            avg = smoothing * avg + (1 - smoothing) * value
            s = avg / (1 - smoothing ** (n + 1))
            smoothed.append(s)
            best = min(best, s)
            if on_step is not None:
                on_step(n + 1, lr, s)
            if n > 0 and s > diverge_factor * best:
                diverged = True
                break
    finally:  # the test leaves no trace on the model it probed
        step.load_state_dict(saved)
        step.optimizer.zero_grad(set_to_none=True)
    finite = [i for i, s in enumerate(smoothed) if math.isfinite(s)]
    suggestions = suggest(np.array(lrs)[finite], np.array(smoothed)[finite]) if len(finite) >= 3 else {}
    return LRFindResult(lrs, losses, smoothed, suggestions, diverged, start_lr, end_lr, num_steps)


def run_range_test(config: TrainConfig, splits, *, start_lr: float, end_lr: float, steps: int,
                   on_step: Callable[[int, float, float], None] | None = None) -> tuple[LRFindResult, str]:
    """The LR range test of ``config``'s model, batch size and optimizer on ``splits``, through the training step
    the recipe trains with (no EMA, no schedule); returns the result and the precision it ran in."""
    from cifarlab import cpu
    from cifarlab.choices import resolve_speed
    from cifarlab.timing import configure_device, resolve_device
    from cifarlab.train import setup_training

    if config.batch_size > len(splits.train_labels):
        raise ConfigError(f"--batch-size {config.batch_size} is larger than the training set "
                          f"({len(splits.train_labels)} images)")
    device = resolve_device(config.device)
    configure_device(device)
    speed = resolve_speed(config.arch, device, config.precision, "auto")
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    _, source, step = setup_training(config, splits, device, speed.precision, speed.channels_last, gen,
                                     total_steps=steps, schedule=False)

    def batches():
        while True:
            yield from source.epoch()

    with cpu.retained_memory(config.retain_memory and device.type == "cpu"):  # as fit() trains
        result = lr_range_test(step, batches(), start_lr=start_lr, end_lr=end_lr, num_steps=steps, on_step=on_step)
    return result, speed.precision
