"""Patch-whitened first convolution, the DAWNBench line's input patch whitening (Page; Jordan's airbench).

Page put a frozen 3x3 conv whose 27 filters whiten 3x3x3 input patches in front of a learnt 1x1 conv. The two
compose to one 3x3 conv, so the seed architecture and its parameter count stay: only the first conv's weight is
*parametrised*, as a learnt 64x27 matrix times the fixed whitening basis, so that SGD steps in whitened
coordinates, where every patch direction has unit variance."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from cifarlab.augment import Normalization
from cifarlab.keep import memo

WHITEN_EPS = 1e-2  # Page's eps on the eigenvalues: bounds the gain of the noisiest directions at 10x


def patch_whitening_basis(images: np.ndarray, norm: Normalization, kernel: int = 3, max_images: int = 10_000,
                          eps: float = WHITEN_EPS) -> torch.Tensor:
    """Whitening filters of the ``kernel`` x ``kernel`` patches of uint8 ``(N, H, W, C)`` images, normalised as
    training normalises them (at most ``max_images``, a fixed random subset): a ``(C*k*k, C*k*k)`` matrix whose row
    ``i`` is eigenvector ``i`` of the patch covariance over sqrt(eigenvalue_i + eps), in conv-weight order. A function
    of the images alone, so that a worker computes it once per training subset."""
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"need a non-empty (N, H, W, C) uint8 array of training images, got shape {images.shape}")
    n = len(images)
    if n > max_images:
        index = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:max_images].sort().values.numpy()
        images = images[index]
    mean = torch.tensor(norm.mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(norm.std, dtype=torch.float64).view(1, -1, 1, 1)
    dim = images.shape[3] * kernel * kernel
    total = torch.zeros(dim, dtype=torch.float64)
    outer = torch.zeros(dim, dim, dtype=torch.float64)
    count = 0
    for start in range(0, len(images), 1000):  # bounded memory: 1,000 images' patches at a time
        x = torch.from_numpy(np.ascontiguousarray(images[start : start + 1000])).permute(0, 3, 1, 2)
        x = (x.to(torch.float64) / 255.0 - mean) / std
        patches = F.unfold(x, kernel).transpose(1, 2).reshape(-1, dim)  # (patches, C*k*k) in weight order
        total += patches.sum(0)
        outer += patches.T @ patches
        count += len(patches)
    centred = total / count
    covariance = outer / count - torch.outer(centred, centred)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    eigenvalues = eigenvalues.clamp_min(0)
    # Largest first, so that row 0 is the smoothest (brightness) filter; the order does not change the product.
    order = eigenvalues.argsort(descending=True)
    filters = eigenvectors[:, order].T / torch.sqrt(eigenvalues[order] + eps).unsqueeze(1)
    return filters.to(torch.float32)


class PatchWhitening(nn.Module):
    """A parametrisation of a conv weight as ``latent @ basis``: learnt ``(out, C*k*k)``, fixed basis."""

    def __init__(self, basis: torch.Tensor, weight_shape: torch.Size) -> None:
        super().__init__()
        self.register_buffer("basis", basis.clone())  # its own: loading a state dict writes into it
        self.weight_shape = tuple(weight_shape)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return (latent @ self.basis.to(latent.dtype)).view(self.weight_shape)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        # The latent that reproduces ``weight`` exactly (the basis is invertible: eps > 0).
        return torch.linalg.solve(self.basis.T, weight.detach().flatten(1).T).T.contiguous()


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The network's input convolution: the first ``Conv2d`` in module order."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module
    raise ValueError(f"{type(model).__name__} has no Conv2d to whiten")


def whiten_first_conv(model: nn.Module, images: np.ndarray, norm: Normalization, *,
                      eps: float = WHITEN_EPS) -> nn.Conv2d:
    """Re-parametrise the model's first conv through the patch-whitening basis of ``images``; returns the conv.

    The learnt matrix starts as Page's 1x1 convolution starts (PyTorch's default init for 27 inputs), so the
    first layer begins with whitened random filters. The parameter count is unchanged.
    """
    conv = first_conv(model)
    if parametrize.is_parametrized(conv, "weight"):
        raise ValueError("the first convolution is already whitened")
    if conv.kernel_size[0] != conv.kernel_size[1] or conv.groups != 1:
        raise ValueError(f"cannot whiten a {conv.kernel_size} conv with {conv.groups} groups")
    device, kernel = conv.weight.device, conv.kernel_size[0]
    basis = memo("whitening basis", (images, norm.mean, norm.std, kernel, eps, str(device)),
                 lambda: patch_whitening_basis(images, norm, kernel=kernel, eps=eps).to(device))
    parametrize.register_parametrization(conv, "weight", PatchWhitening(basis, conv.weight.shape))
    latent = conv.parametrizations.weight.original
    with torch.no_grad():
        bound = 1.0 / math.sqrt(latent.shape[1])  # kaiming_uniform(a=sqrt(5)) of a 1x1 conv: U(-1/sqrt(fan_in), ..)
        latent.uniform_(-bound, bound)  # the global RNG, seeded like every other init
    return conv
