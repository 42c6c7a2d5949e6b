"""LR range test (Smith 2015, as fastai and torch-lr-finder run it): the way the seeds chose LRMIN/LRMAX.

The learning rate grows exponentially from ``start_lr`` to ``end_lr`` over ``num_steps`` training steps; the
loss is smoothed with an exponential moving average (bias-corrected) and the sweep stops once the smoothed
loss exceeds ``diverge_factor`` times its best. Model and optimizer state are restored afterwards, so the
test leaves no trace on the model it probed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from cifarlab.errors import ConfigError


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


def lr_range_test(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    criterion: nn.Module,
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    smoothing: float = 0.98,
    diverge_factor: float = 4.0,
    autocast=None,
    logit_scale: float = 1.0,
    on_step: Callable[[int, float, float], None] | None = None,
) -> LRFindResult:
    """``on_step(step, lr, smoothed_loss)`` is called after each step (a progress display: a step of a large model
    takes seconds on a CPU), with ``step`` counted from 1."""
    if not 0 < start_lr < end_lr:
        raise ConfigError(f"need 0 < start-lr < end-lr, got {start_lr} and {end_lr}")
    if num_steps < 3:
        raise ConfigError(f"the LR range test needs at least 3 steps, got {num_steps}")
    model_state = copy.deepcopy(model.state_dict())
    optim_state = copy.deepcopy(optimizer.state_dict())
    was_training = model.training
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    diverged = False
    avg, best = 0.0, math.inf
    gamma = (end_lr / start_lr) ** (1.0 / (num_steps - 1))
    try:
        model.train()
        for step in range(num_steps):
            lr = start_lr * gamma**step
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # a group's fixed multiple (--bias-lr-scale)
            x, y = next(batches)
            ctx = autocast() if autocast is not None else torch.autocast("cpu", enabled=False)
            with ctx:
                loss = criterion(model(x).float() * logit_scale, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            lrs.append(lr)
            losses.append(value)
            if not math.isfinite(value):
                diverged = True
                smoothed.append(math.inf)
                break
            avg = smoothing * avg + (1 - smoothing) * value
            s = avg / (1 - smoothing ** (step + 1))
            smoothed.append(s)
            best = min(best, s)
            if on_step is not None:
                on_step(step + 1, lr, s)
            if step > 0 and s > diverge_factor * best:
                diverged = True
                break
    finally:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
    finite = [i for i, s in enumerate(smoothed) if math.isfinite(s)]
    suggestions = suggest(np.array(lrs)[finite], np.array(smoothed)[finite]) if len(finite) >= 3 else {}
    return LRFindResult(lrs, losses, smoothed, suggestions, diverged, start_lr, end_lr, num_steps)
