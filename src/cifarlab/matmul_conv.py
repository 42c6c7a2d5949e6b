"""3x3 convolutions on small feature maps as one matrix product each way, for the CPU.

``bench.devices``' per-layer table showed oneDNN's bf16 kernels for the 512-channel 4x4 layers (both models' last
stage) computing their weight gradient at 0.22-0.25 TFLOP/s, against 1.1-2.2 for the same layers' 16x16
cousins and ~2 for a plain bf16 matrix product: the kernel parallelises over too little spatial work. With
channels-last activations a stride-1, pad-1 3x3 conv is exactly

    out (N*H*W, O) = cols (N*H*W, 9*C) @ W (9*C, O),   cols = the nine shifted copies of the padded input,

so forward, input gradient and weight gradient are each one large GEMM that runs near the matmul peak, plus a
copy to build ``cols`` (kept for the weight gradient). The input gradient is the same product over the output
gradient's ``cols`` with the kernel flipped.

``MatmulConv2d`` is a drop-in ``nn.Conv2d`` (same parameters and state dict) that takes this path on the CPU
when the feature map has at most ``max_pixels`` positions and the conv is a plain 3x3/stride 1/pad 1 one;
otherwise, and on CUDA, where cuDNN has no such gap, it is ``nn.Conv2d``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_MAX_PIXELS = 16  # 4x4: the maps where oneDNN lost the most (bench.devices' conv table shows it)


def _im2col_nhwc(x_nhwc: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) -> (N*H*W, 9*C): for each position, its 3x3 neighbourhood in (row, column, channel) order.

    One strided view of the zero-padded input (windows overlap in memory) and one copy: half the time of
    concatenating the nine shifted slices.
    """
    n, h, w, c = x_nhwc.shape
    xp = F.pad(x_nhwc, (0, 0, 1, 1, 1, 1))
    s = xp.stride()
    windows = xp.as_strided((n, h, w, 3, 3, c), (s[0], s[1], s[2], s[1], s[2], s[3]))
    return windows.reshape(n * h * w, 9 * c)


class _MatmulConv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        o = weight.shape[0]
        cols = _im2col_nhwc(x.permute(0, 2, 3, 1))  # a view of a channels-last x; a copy of an NCHW one
        out = cols @ weight.permute(0, 2, 3, 1).reshape(o, 9 * c).t()  # (NHW, O); weight in (row, col, ch) order
        ctx.save_for_backward(cols, weight)
        ctx.shape = (n, c, h, w)
        return out.view(n, h, w, o).permute(0, 3, 1, 2)  # logical NCHW with channels-last strides

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        cols, weight = ctx.saved_tensors
        n, c, h, w = ctx.shape
        o = weight.shape[0]
        g = grad_out.permute(0, 2, 3, 1)
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (g.reshape(n * h * w, o).t() @ cols).view(o, 3, 3, c).permute(0, 3, 1, 2).contiguous()
        if ctx.needs_input_grad[0]:
            # The input gradient is the same kind of conv of the output gradient, with the kernel flipped and
            # its in/out channels swapped: dX[y, x] = sum_ij g[y + 1 - i, x + 1 - j] W[i, j].
            flipped = weight.flip(2, 3).permute(2, 3, 0, 1).reshape(9 * o, c)
            grad_x = (_im2col_nhwc(g) @ flipped).view(n, h, w, c).permute(0, 3, 1, 2)
        return grad_x, grad_w


def matmul_conv3x3(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(x, weight, padding=1)`` for a 3x3 kernel, as GEMMs (under autocast, in its dtype)."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    elif x.dtype != weight.dtype:
        weight = weight.to(x.dtype)
    return _MatmulConv3x3.apply(x, weight)


class MatmulConv2d(nn.Conv2d):
    """``nn.Conv2d`` that computes small-map 3x3 convs on the CPU with ``matmul_conv3x3``."""

    max_pixels: int = DEFAULT_MAX_PIXELS

    def _takes_matmul_path(self, x: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and x.dim() == 4 and x.shape[2] * x.shape[3] <= self.max_pixels
                and self.kernel_size == (3, 3) and self.stride == (1, 1) and self.padding == (1, 1)
                and self.dilation == (1, 1) and self.groups == 1 and self.padding_mode == "zeros")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._takes_matmul_path(x):
            return super().forward(x)
        out = matmul_conv3x3(x, self.weight)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype).view(1, -1, 1, 1)
        return out


def use_matmul_convs(model: nn.Module, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """Turn every plain ``nn.Conv2d`` of ``model`` into a ``MatmulConv2d`` in place; returns how many.

    Parameters, buffers and state-dict keys are unchanged (the class is a subclass); the path is chosen per call
    from the input's device and size, so a model moved to CUDA runs cuDNN as before.
    """
    count = 0
    for module in model.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = MatmulConv2d
            count += 1
        if isinstance(module, MatmulConv2d):
            module.max_pixels = max_pixels
    return count
