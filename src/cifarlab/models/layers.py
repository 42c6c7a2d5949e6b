"""Layer swaps for the DAWNBench line's training tricks, applied to a built model in place.

Both keep the seed architectures' parameters and state-dict keys: they change how a layer computes, not what
it holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CELU_ALPHA = 0.3  # Page's final recipe (and airbench's reproduction of it)
ACTIVATIONS = ("relu", "celu")


class GhostBatchNorm2d(nn.BatchNorm2d):
    """Batch norm whose training statistics come from ghost batches of at least ``ghost_batch`` images each.

    Smaller batches give noisier statistics, which regularise (Hoffer et al. 2017; Page uses 32 of 512). A batch
    splits into ``n // ghost_batch`` ghost batches as equal as they can be; the running statistics move by their
    mean. On the CPU one ``batch_norm`` per ghost batch; on CUDA, where each call is a launch the step waits on, the
    ghost batches are folded into the channels and normalised by one call."""

    ghost_batch: int = 32
    form: str = "auto"  # "chunked", "folded", or "auto": folded on CUDA, chunked elsewhere (set for benchmarks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        splits = n // self.ghost_batch
        if not self.training or splits <= 1:
            return super().forward(x)
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 0.1
        # the fold needs ghost batches of one size; an uneven split takes the chunked form on any device
        if n % splits == 0 and (self.form == "folded" or (self.form == "auto" and x.is_cuda)):
            return self.forward_folded(x, splits, momentum)
        # one split (its backward is one cat), not tensor_split: that makes a slice per ghost batch, and each
        # slice's backward zero-fills a gradient of the whole batch (16 per layer: 28% of a ResNet-18 step)
        sizes = [n // splits + (i < n % splits) for i in range(splits)]
        return torch.cat([F.batch_norm(chunk, self.running_mean, self.running_var, self.weight, self.bias, True,
                                       momentum / splits, self.eps) for chunk in x.split(sizes)])

    def forward_folded(self, x: torch.Tensor, splits: int, momentum: float) -> torch.Tensor:
        """One ``batch_norm`` call: ghost batch ``s``'s channels become channels ``s*C .. s*C + C-1`` of a batch of
        ``ghost_batch`` images. The running statistics move by ``momentum`` x the mean over the ghost batches."""
        n, c, h, w = x.shape
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        folded = x.view(splits, n // splits, c, h, w).transpose(0, 1).reshape(n // splits, splits * c, h, w)
        # each of C channels' buffers and parameters, once per ghost batch
        mean, var, weight, bias = (t.repeat(splits) if t is not None else None
                                   for t in (self.running_mean, self.running_var, self.weight, self.bias))
        y = F.batch_norm(folded, mean, var, weight, bias, True, momentum, self.eps)
        if mean is not None and var is not None:
            with torch.no_grad():
                self.running_mean.copy_(mean.view(splits, c).mean(0))
                self.running_var.copy_(var.view(splits, c).mean(0))
        y = y.view(n // splits, splits, c, h, w).transpose(0, 1).reshape(n, c, h, w)
        return y.contiguous(memory_format=torch.channels_last) if channels_last else y


def use_ghost_batch_norm(model: nn.Module, ghost_batch: int) -> int:
    """Turn every plain ``nn.BatchNorm2d`` into a ``GhostBatchNorm2d`` of ``ghost_batch`` images; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = GhostBatchNorm2d
        if isinstance(module, GhostBatchNorm2d):
            module.ghost_batch = ghost_batch
            count += 1
    return count


def use_activation(model: nn.Module, name: str) -> int:
    """Replace every ``nn.ReLU`` of ``model`` with ``name`` (relu: no change; celu: CELU(0.3)); returns how many."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}")
    count = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                count += 1
                if name == "celu":
                    setattr(parent, child_name, nn.CELU(CELU_ALPHA, inplace=child.inplace))
    return count
