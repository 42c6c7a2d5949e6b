"""3x3 convolutions on small feature maps as one matrix product each way, for the CPU.

With channels-last activations a stride-1, pad-1 3x3 conv is ``out (N*H*W, O) = cols (N*H*W, 9*C) @ W (9*C, O)``
with ``cols`` the nine shifted copies of the padded input, so each pass is one large GEMM that runs near the
matmul peak, where oneDNN's kernels parallelise over too little spatial work (docs/performance.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.timing import CONV_BACKWARD_ANNOTATION, CONV_FORWARD_ANNOTATION

DEFAULT_MAX_PIXELS = 16  # 4x4: the maps where oneDNN lost the most (bench.devices' conv table shows it)


def _im2col(x_nhwc: torch.Tensor, kernel: tuple[int, int] = (3, 3), stride: tuple[int, int] = (1, 1),
            padding: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """(N, H, W, C) -> (N*Ho*Wo, kh*kw*C): each output position's neighbourhood in (row, column, channel) order.

    One strided view of the zero-padded input (windows overlap in memory) and one copy: half the time of
    concatenating the shifted slices.
    """
    n, h, w, c = x_nhwc.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    xp = F.pad(x_nhwc, (0, 0, pw, pw, ph, ph)) if ph or pw else x_nhwc
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    s = xp.stride()
    windows = xp.as_strided((n, ho, wo, kh, kw, c), (s[0], sh * s[1], sw * s[2], s[1], s[2], s[3]),
                            xp.storage_offset())
    return windows.reshape(n * ho * wo, kh * kw * c)


class _MatmulConv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        o = weight.shape[0]
        with torch.profiler.record_function(CONV_FORWARD_ANNOTATION):
            cols = _im2col(x.permute(0, 2, 3, 1))  # a view of a channels-last x; a copy of an NCHW one
            out = cols @ weight.permute(0, 2, 3, 1).reshape(o, 9 * c).t()  # (NHW, O); weight in (row, col, ch)
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
        with torch.profiler.record_function(CONV_BACKWARD_ANNOTATION):
            if ctx.needs_input_grad[1]:
                grad_w = (g.reshape(n * h * w, o).t() @ cols).view(o, 3, 3, c).permute(0, 3, 1, 2).contiguous()
            if ctx.needs_input_grad[0]:
                # The input gradient is the same kind of conv of the output gradient, with the kernel flipped and
                # its in/out channels swapped: dX[y, x] = sum_ij g[y + 1 - i, x + 1 - j] W[i, j].
                flipped = weight.flip(2, 3).permute(2, 3, 0, 1).reshape(9 * o, c)
                grad_x = (_im2col(g) @ flipped).view(n, h, w, c).permute(0, 3, 1, 2)
        return grad_x, grad_w


class _GemmWeightGradConv(torch.autograd.Function):
    """oneDNN's forward and input gradient; the weight gradient as one GEMM over the im2col of the input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int],
                padding: tuple[int, int]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding)
        return F.conv2d(x, weight, None, stride, padding)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        stride, padding = ctx.geometry
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(grad_out, x, weight, None, list(stride), list(padding),
                                                         [1, 1], False, [0, 0], 1, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            o, c, kh, kw = weight.shape
            with torch.profiler.record_function(CONV_BACKWARD_ANNOTATION):
                cols = _im2col(x.permute(0, 2, 3, 1), (kh, kw), stride, padding)
                g = grad_out.permute(0, 2, 3, 1).reshape(cols.shape[0], o)
                grad_w = (g.t() @ cols).view(o, kh, kw, c).permute(0, 3, 1, 2).contiguous()
        return grad_x, grad_w, None, None


def _same_dtype(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both in autocast's dtype when it is on (as F.conv2d would run), else the weight in the input's."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        return x.to(dtype), weight.to(dtype)
    return x, weight.to(x.dtype)


def gemm_weight_grad_conv(x: torch.Tensor, weight: torch.Tensor, stride=(1, 1), padding=(1, 1)) -> torch.Tensor:
    """``F.conv2d`` whose weight gradient is computed as a GEMM (under autocast, in its dtype)."""
    return _GemmWeightGradConv.apply(*_same_dtype(x, weight), tuple(stride), tuple(padding))


def matmul_conv3x3(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(x, weight, padding=1)`` for a 3x3 kernel, as GEMMs (under autocast, in its dtype)."""
    return _MatmulConv3x3.apply(*_same_dtype(x, weight))


class MatmulConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state dict) that computes convs with small output maps on the CPU with
    GEMMs: plain 3x3 stride-1 convs wholly, other convs into such maps (stride-2 and 1x1 shortcuts) their weight
    gradient only, oneDNN's slow pass there."""

    max_pixels: int = DEFAULT_MAX_PIXELS

    def gemm_path(self, x: torch.Tensor) -> str | None:
        """"gemm", "weight-gemm" or None (oneDNN / cuDNN) for an input like ``x``."""
        if (x.device.type != "cpu" or x.dim() != 4 or isinstance(self.padding, str) or self.groups != 1
                or self.dilation != (1, 1) or self.padding_mode != "zeros"):
            return None
        plain3x3 = self.kernel_size == (3, 3) and self.stride == (1, 1) and self.padding == (1, 1)
        out_h = (x.shape[2] + 2 * self.padding[0] - self.kernel_size[0]) // self.stride[0] + 1
        out_w = (x.shape[3] + 2 * self.padding[1] - self.kernel_size[1]) // self.stride[1] + 1
        if out_h * out_w > self.max_pixels:
            return None
        return "gemm" if plain3x3 else "weight-gemm"

    def gemm_conv(self, x: torch.Tensor, weight: torch.Tensor, path: str | None = None) -> torch.Tensor:
        """This conv's GEMM path for ``x`` (which must have one; ``path`` if already asked), without the bias."""
        path = path or self.gemm_path(x)
        if path == "gemm":
            return matmul_conv3x3(x, weight)
        return gemm_weight_grad_conv(x, weight, self.stride, self.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self.gemm_path(x)
        if path is None:
            return super().forward(x)
        out = self.gemm_conv(x, self.weight, path)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype).view(1, -1, 1, 1)
        return out


def use_matmul_convs(model: nn.Module, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """Turn every plain ``nn.Conv2d`` of ``model`` into a ``MatmulConv2d`` in place (the path is chosen per call,
    so CUDA runs cuDNN as before); returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = MatmulConv2d
            count += 1
        if isinstance(module, MatmulConv2d):
            module.max_pixels = max_pixels
    return count
