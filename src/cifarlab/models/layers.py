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
    of a 512 batch). Each ghost batch updates the running statistics with ``momentum / ghost batches``, so that
    one step moves them as far as plain batch norm does; evaluation uses them as usual. A batch that does not
    split evenly is normalised whole.
    """

    ghost_batch: int = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        splits = n // self.ghost_batch
        if not self.training or splits <= 1 or n % self.ghost_batch:
            return super().forward(x)
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        momentum = (self.momentum if self.momentum is not None else 0.1) / splits
        # Chunks along the batch are views in NCHW and channels-last alike.
        return torch.cat([F.batch_norm(chunk, self.running_mean, self.running_var, self.weight, self.bias, True,
                                       momentum, self.eps) for chunk in x.chunk(splits)])


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
