"""Evaluation at inference speed, with test-time augmentation: plain, the mirror, and airbench's shifted pair."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.augment import EvalBatches, Normalization
from cifarlab.errors import ConfigError
from cifarlab.step import autocast


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    predictions: np.ndarray
    tta: bool = False
    views: str = "none"  # which test-time augmentation: one of TTA_VIEWS


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
    """Loss and accuracy at inference speed (no autograd, the training precision, large batches). ``tta``: "none",
    "flip" (or True) or "flip-shift" (``TTA_VIEWS``); ``stop``, asked before each batch, ends it with
    ``EvaluationStopped``."""
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


NO_VALIDATION = EvalResult(loss=float("nan"), accuracy=float("nan"), predictions=np.empty(0, np.int64))
