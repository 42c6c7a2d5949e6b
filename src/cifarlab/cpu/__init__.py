"""CPU-only speed choices, entered here and nowhere else: GEMM convolutions for small maps and kept freed memory.

Why each pays, and on which machine, is in docs/performance.md. Nothing here changes a result or runs on CUDA.
"""

from __future__ import annotations

import torch
from torch import nn

from cifarlab.cpu.gemm_conv import MatmulConv2d, use_matmul_convs
from cifarlab.cpu.memory import freed_memory_retained, retain_freed_memory, retained_memory

__all__ = ["conv_kernel", "freed_memory_retained", "gemm_conv", "retain_freed_memory", "retained_memory",
           "use_cpu_kernels"]


def use_cpu_kernels(model: nn.Module, gemm_convs: bool = True) -> nn.Module:
    """``model`` with its convs on maps of 4x4 or less computed as GEMMs on the CPU (in place; same parameters,
    same state-dict keys; each call picks its kernel from the input, so CUDA is untouched)."""
    if gemm_convs:
        use_matmul_convs(model)
    return model


def conv_kernel(conv: nn.Module, x: torch.Tensor) -> str | None:
    """The GEMM path ``conv`` takes for an input like ``x``: "gemm", "weight-gemm", or None (the library's)."""
    return conv.gemm_path(x) if isinstance(conv, MatmulConv2d) else None


def gemm_conv(conv: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``conv``'s GEMM path applied to ``x`` with ``weight`` (no bias): timed alone by the breakdown."""
    return conv.gemm_conv(x, weight)
