"""3x3 convolutions as Winograd's minimal filtering F(4x4, 3x3), for fp32 training on CPUs without bf16 units.

On an AVX2 CPU (no AVX-512, AMX or bf16 units) training runs in fp32, and oneDNN's direct 3x3 convs already run
at 60-97% of the fp32 matmul peak: no kernel choice can make them much faster. Winograd's algorithm (Lavin &
Gray, "Fast Algorithms for Convolutional Neural Networks", 2016) needs fewer multiplications instead: each 6x6
tile of the padded input gives a 4x4 tile of the output with 36 multiply-adds per input/output channel pair
instead of 144, so the products shrink 4x, at the price of linear transforms of input, weight and output:

    out tile = A^T [ (G g G^T) * (B^T d B) ] A      (* elementwise; summed over input channels)

Summing over channels turns the elementwise product into 36 matrix products, one per tile position:
``M[k] = V[k] @ U[k]``, V (tiles, C_in), U (C_in, C_out). Each transform is applied separably, as two small
matrix products (over a tile's rows, then its columns: a third of the multiply-adds of one product with the
36x36 Kronecker matrix, which it replaced), and the batch is handled in chunks of a few megabytes so that a
chunk's transformed tiles stay in cache between the transform and the products: on a 2-core EPYC the unchunked
version lost to oneDNN on 64-channel layers, where the transforms cost as much as the products.

The backward pass is the same algorithm transposed (the products' gradients are two more batched products, the
transforms' gradients their transposed matrices); the input's transform is recomputed per chunk rather than
kept, and each chunk is zero-padded in cache, so what stays in memory is the input itself, as a direct conv
keeps it (most often the tensor that the ReLU before keeps anyway). The input's gradient is written straight
into place: each tile's inner 4x4 block copied, its border rows and columns added to the neighbouring blocks.
Measured on the 2-core EPYC (fp32, batch 512, steps in turns within one process): the same step time as with a
padded copy of each input kept and a zeroed padded gradient per chunk (median paired ratios 0.996 for the custom
ResNet over twelve steps, 1.006 for ResNet-18 over eight), and a lower peak resident memory (3.13-3.22 GB
against 3.40-3.42 for the custom ResNet, 4.53 against 5.01 for ResNet-18). Below
``FORWARD_MIN_CHANNELS`` input channels the forward pass is oneDNN's direct conv, which was faster there, and
only the backward pass is Winograd's.

Errors (a 128->128 conv on 16x16 maps against an fp64 conv, the largest error over the largest output): fp32
Winograd 7.7e-6 against 1.3e-6 for oneDNN's fp32 conv, both far under the 3.4e-3 of oneDNN's bf16 conv that
bf16 training lives with. In bf16 Winograd's transforms gave 9.9e-2, so ``MatmulConv2d`` takes this path only
in fp32 without autocast, on the CPU, where bf16 units are missing (with bf16 units the CPU trains in bf16).
cuDNN chooses its own Winograd kernels on CUDA.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from cifarlab.timing import CONV_BACKWARD_ANNOTATION, CONV_FORWARD_ANNOTATION

# F(4x4, 3x3) with interpolation points 0, 1, -1, 2, -2 and infinity (Lavin & Gray, section 4.2).
_BT = [[4, 0, -5, 0, 1, 0],
       [0, -4, -4, 1, 1, 0],
       [0, 4, -4, -1, 1, 0],
       [0, -2, -1, 2, 1, 0],
       [0, 2, -1, -2, 1, 0],
       [0, 4, 0, -5, 0, 1]]
_G = [[1 / 4, 0, 0],
      [-1 / 6, -1 / 6, -1 / 6],
      [-1 / 6, 1 / 6, -1 / 6],
      [1 / 24, 1 / 12, 1 / 6],
      [1 / 24, -1 / 12, 1 / 6],
      [0, 0, 1]]
_AT = [[1, 1, 1, 1, 1, 0],
       [0, 1, -1, 2, -2, 0],
       [0, 1, 1, 4, 4, 0],
       [0, 1, -1, 8, -8, 1]]

TILE = 4  # output tile side; the input tile is TILE + 2
CHUNK_BYTES = 4 << 20  # transformed input tiles per chunk: a few MB, so that they stay in cache
MIN_CHUNK_TILES = 256  # and enough rows that the products stay efficient on wide layers
# Measured on the 2-core EPYC (fp32, channels_last, forward + both gradients, against oneDNN): each conv alone at
# batch 128, 1.1-2.1x on the custom ResNet's 64- to 512-channel layers, 0.8-1.1x on ResNet-18's 64->64 convs at
# 32x32, and nothing to win on a 3-channel first conv, whose transforms outweigh its products (the products per
# transformed value grow with C_in * C_out / (C_in + C_out)). Whole training steps in turns: ResNet-18 at batch
# 128 trained at 28.4 img/s with its 64->64 convs on Winograd against 30.8 without them (oneDNN throughout: 25.1).
DEFAULT_MIN_CHANNELS = 64  # input channels
MIN_OUT_CHANNELS = 128  # and output channels: 64->128 takes it, 64->64 does not
# The forward pass alone is Winograd's from this many input channels; below, oneDNN's direct forward was faster
# (each conv at batch 128, in turns, on the 2-core EPYC: 64->128 on 32x32 maps 144-177 ms direct against 185-223
# Winograd; 128->128 on 16x16 71-79 against 65-72) while Winograd's backward still won 1.5x, so such a conv
# runs its forward direct and its backward by Winograd.
FORWARD_MIN_CHANNELS = 128


@functools.cache
def factors(device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """(B^T 6x6, G 6x3, A^T 4x6) on ``device`` in ``dtype``, made once per device and dtype."""
    return tuple(torch.tensor(m, dtype=torch.float64).to(device=device, dtype=dtype) for m in (_BT, _G, _AT))


def _two_sided(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``m X m^T`` for every trailing index r of ``x``: (k, k, R) -> (j, j, R) for ``m`` (j, k).

    Two passes of k multiply-adds per value instead of one pass of k^2 with the Kronecker product ``m (x) m``
    (a third of the work on input tiles); measured on the 2-core EPYC, a conv's forward and backward took 8-18%
    less time on 64- to 128-channel layers this way.
    """
    j, k = m.shape
    r = x.shape[-1]
    y = (m @ x.reshape(k, k * r)).view(j, k, r)  # rows: y[a, q] = sum_p m[a, p] x[p, q]
    return torch.matmul(m, y)  # columns, for each a: out[a, b] = sum_q m[b, q] y[a, q]


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``winograd_conv3x3`` can take this conv: fp32 (or fp64) without autocast, a 3x3 kernel, maps a
    multiple of 4. Lower precisions are left out: the transforms would cost them about two significant digits."""
    return (x.dim() == 4 and x.dtype in (torch.float32, torch.float64) and weight.dtype == x.dtype
            and tuple(weight.shape[2:]) == (3, 3) and x.shape[2] % TILE == 0 and x.shape[3] % TILE == 0
            and x.shape[2] > 0 and x.shape[3] > 0 and not torch.is_autocast_enabled(x.device.type))


def _tiles(xp: torch.Tensor, th: int, tw: int) -> torch.Tensor:
    """(n, H+2, W+2, c) padded NHWC -> (6, 6, n, th, tw, c): the overlapping input tiles, as a view."""
    n, _, _, c = xp.shape
    s = xp.stride()
    return xp.as_strided((TILE + 2, TILE + 2, n, th, tw, c), (s[1], s[2], s[0], TILE * s[1], TILE * s[2], s[3]),
                         xp.storage_offset())


def _images_per_chunk(tiles_per_image: int, channels: int) -> int:
    tiles = max(MIN_CHUNK_TILES, CHUNK_BYTES // (36 * channels * 4))  # counted in fp32
    return max(1, tiles // tiles_per_image)


def _padded_nhwc(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # one copy


def _weight_tiles(g3: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(o, c, 3, 3) -> (36, c, o): G g G^T for every input/output channel pair."""
    o, c = weight.shape[:2]
    return _two_sided(g3, weight.permute(2, 3, 1, 0).reshape(3, 3, c * o)).view(36, c, o)


# How one axis of a 6-wide input-gradient tile lands on the unpadded map, whose tiles start every 4 pixels one
# pixel before their output tile (the padding): (tile rows, phases within the 4-pixel block, source tiles,
# destination tiles). Rows 1-4 are the tile's own block; row 0 is phase 3 of the tile before; row 5 phase 0 of
# the tile after. The first tile's row 0 and the last tile's row 5 fall on the padding and are dropped.
_LANDINGS = ((slice(1, TILE + 1), slice(0, TILE), slice(None), slice(None)),
             (slice(0, 1), slice(TILE - 1, TILE), slice(1, None), slice(None, -1)),
             (slice(TILE + 1, TILE + 2), slice(0, 1), slice(None, -1), slice(1, None)))


def _overlap_add(gx: torch.Tensor, gd: torch.Tensor) -> None:
    """Overwrite ``gx`` (m, h, w, c) with the sum of the 6x6 input-gradient tiles ``gd`` (6, 6, m, th, tw, c)
    laid at a stride of 4 with a one-pixel border cut off: the tiles' inner 4x4 blocks copied into place, then
    their border rows, columns and corners added to the neighbouring blocks. Straight into the gradient, with
    no zeroed padded buffer and no copy out of one."""
    m, h, w, c = gx.shape
    blocks = gx.view(m, h // TILE, TILE, w // TILE, TILE, c).permute(2, 4, 0, 1, 3, 5)  # (4, 4, m, th, tw, c)
    for r, (r_tile, r_phase, r_src, r_dst) in enumerate(_LANDINGS):
        for k, (c_tile, c_phase, c_src, c_dst) in enumerate(_LANDINGS):
            dst = blocks[r_phase, c_phase, :, r_dst, c_dst]
            src = gd[r_tile, c_tile, :, r_src, c_src]
            if r == k == 0:
                dst.copy_(src)
            else:
                dst.add_(src)


class _WinogradConv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, direct_forward: bool) -> torch.Tensor:
        n, c, h, w = x.shape
        o = weight.shape[0]
        th, tw = h // TILE, w // TILE
        ctx.geometry = (n, c, h, w, o)
        if direct_forward:  # oneDNN's forward; the padded input and weight tiles are made by the backward pass
            with torch.profiler.record_function(CONV_FORWARD_ANNOTATION):
                out = F.conv2d(x.contiguous(memory_format=torch.channels_last), weight, padding=1)
            ctx.save_for_backward(x, weight)
            ctx.direct_forward = True
            return out
        with torch.profiler.record_function(CONV_FORWARD_ANNOTATION):
            bt, g3, at = factors(x.device, x.dtype)
            u = _weight_tiles(g3, weight)
            out = torch.empty(n, h, w, o, device=x.device, dtype=x.dtype)
            step = _images_per_chunk(th * tw, c)
            for i in range(0, n, step):
                xc = _padded_nhwc(x[i:i + step])  # padded per chunk, in cache, rather than the whole batch
                m = xc.shape[0]
                tiles = m * th * tw
                v = _two_sided(bt, _tiles(xc, th, tw).reshape(6, 6, tiles * c)).view(36, tiles, c)
                y = _two_sided(at, torch.bmm(v, u).view(6, 6, tiles * o)).view(TILE, TILE, m, th, tw, o)
                out[i:i + m].view(m, th, TILE, tw, TILE, o).copy_(y.permute(2, 3, 0, 4, 1, 5))
        ctx.save_for_backward(x, u)
        ctx.direct_forward = False
        return out.permute(0, 3, 1, 2)  # logical NCHW with channels-last strides

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        n, c, h, w, o = ctx.geometry
        th, tw = h // TILE, w // TILE
        with torch.profiler.record_function(CONV_BACKWARD_ANNOTATION):
            if ctx.direct_forward:
                x, weight = ctx.saved_tensors
                bt, g3, at = factors(x.device, x.dtype)
                u = _weight_tiles(g3, weight)
            else:
                x, u = ctx.saved_tensors
                bt, g3, at = factors(x.device, x.dtype)
            b, a = bt.t(), at.t()  # the transposed transforms
            want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            g = grad_out.permute(0, 2, 3, 1)
            grad_u = torch.zeros_like(u) if want_w else None
            grad_x = torch.empty(n, h, w, c, device=x.device, dtype=x.dtype) if want_x else None
            ut = u.transpose(1, 2)
            step = _images_per_chunk(th * tw, max(c, o))
            for i in range(0, n, step):
                gc = g[i:i + step]
                m = gc.shape[0]
                tiles = m * th * tw
                gy = gc.reshape(m, th, TILE, tw, TILE, o).permute(2, 4, 0, 1, 3, 5).reshape(TILE, TILE, tiles * o)
                gm = _two_sided(a, gy).view(36, tiles, o)
                if want_w:  # the input's transform again, from a chunk padded in cache, rather than kept
                    xc = _tiles(_padded_nhwc(x[i:i + m]), th, tw)
                    v = _two_sided(bt, xc.reshape(6, 6, tiles * c)).view(36, tiles, c)
                    grad_u.baddbmm_(v.transpose(1, 2), gm)
                if want_x:
                    gd = _two_sided(b, torch.bmm(gm, ut).view(6, 6, tiles * c)).view(TILE + 2, TILE + 2, m, th, tw, c)
                    _overlap_add(grad_x[i:i + m], gd)
            grad_w = None
            if want_w:
                grad_w = _two_sided(g3.t(), grad_u.view(6, 6, c * o)).view(3, 3, c, o).permute(3, 2, 0, 1).contiguous()
        return (grad_x.permute(0, 3, 1, 2) if want_x else None), grad_w, None


def forward_is_direct(in_channels: int) -> bool:
    """Whether a Winograd conv with this many input channels runs its forward pass as oneDNN's direct conv."""
    return in_channels < FORWARD_MIN_CHANNELS


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, direct_forward: bool | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, padding=1)`` for a 3x3 kernel by Winograd F(4x4, 3x3); see ``supports``.

    ``direct_forward`` runs the forward pass as oneDNN's direct conv and only the backward by Winograd; None
    chooses by ``FORWARD_MIN_CHANNELS``. The result has channels-last strides whatever ``x``'s layout.
    """
    if not supports(x, weight):
        raise ValueError(f"Winograd F(4x4, 3x3) needs fp32 or fp64 without autocast, a 3x3 kernel and maps a "
                         f"multiple of {TILE}; got {tuple(x.shape)} {x.dtype} with a {tuple(weight.shape)} "
                         f"{weight.dtype} kernel")
    if direct_forward is None:
        direct_forward = forward_is_direct(x.shape[1])
    return _WinogradConv3x3.apply(x, weight, direct_forward)
