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
    """Batch norm whose training statistics come from ghost batches of ``ghost_batch`` images each.

    Smaller batches give noisier statistics, which regularise (Hoffer et al. 2017; Page's recipe uses 32 images
    of a 512 batch). A batch of ``n`` images splits into ``n // ghost_batch`` ghost batches of consecutive
    images, as equal as they can be: each holds at least ``ghost_batch`` images, so the statistics are never
    noisier than asked (a batch of 256 with ghost batches of 48 splits into 52 + 4 x 51), and a batch under twice
    ``ghost_batch`` is normalised whole. One step moves the running statistics as far as plain batch norm does,
    by the mean of the ghost batches' statistics; evaluation uses them as usual.

    Two ways to compute the same thing, by device. On the CPU one ``batch_norm`` per ghost batch (chunks are views
    in NCHW and channels-last alike): each kernel runs in the calling thread, and this was 7-12% faster than the
    folded form on a 2-core EPYC. On CUDA the 16 calls per layer and their backward are 16 times the kernel
    launches, and a launch-bound GPU step waits on every one of them; there the ghost batches are folded into the
    channels and normalised by one call. On an H200 (custom ResNet, batch 512, bf16) that trained 48,015 img/s
    against the chunked form's 25,231 in channels_last, and 52,740 against 33,031 in NCHW, as fast as plain batch
    norm there (51,395); in channels_last the fold's copies in and out cost against plain batch norm's 90,312.
    A channels-last fold (one copy in, one out) was slower there, 12.53 against 11.63 ms a step: cuDNN normalises
    the folded NCHW batch faster than a channels-last one.
    """

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
