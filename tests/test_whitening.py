import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from cifarlab.augment import Normalization
from cifarlab.config import TrainConfig
from cifarlab.data import load_splits
from cifarlab.models import create_model, list_models
from cifarlab.train import fit
from cifarlab.whitening import PatchWhitening, first_conv, patch_whitening_basis, whiten_first_conv


def smooth_images(n: int = 300, seed: int = 0) -> np.ndarray:
    """Images with strongly correlated neighbouring pixels (as photographs have): 4x4 blocks of one value."""
    coarse = np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return np.repeat(np.repeat(coarse, 4, 1), 4, 2)


def normalised_patches(images: np.ndarray, norm: Normalization) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255
    x = (x - torch.tensor(norm.mean).double().view(1, 3, 1, 1)) / torch.tensor(norm.std).double().view(1, 3, 1, 1)
    return F.unfold(x, 3).transpose(1, 2).reshape(-1, 27)


def test_basis_whitens_the_patches_it_was_computed_from():
    images = smooth_images()
    norm = Normalization.from_images(images)
    patches = normalised_patches(images, norm)
    raw = torch.cov(patches.T)
    # Neighbouring pixels of these images are correlated: the raw covariance is far from the identity.
    assert (raw - torch.eye(27, dtype=raw.dtype)).abs().max() > 0.5
    basis = patch_whitening_basis(images, norm, eps=0.0).double()
    assert basis.shape == (27, 27)
    white = torch.cov((patches @ basis.T).T)
    assert torch.allclose(white, torch.eye(27, dtype=white.dtype), atol=1e-3)
    # eps bounds the gain of the weakest directions: no row of the basis grows past 1/sqrt(eps).
    bounded = patch_whitening_basis(images, norm, eps=1e-2)
    assert bounded.norm(dim=1).max() <= 10.0 + 1e-4


def test_basis_refuses_an_empty_image_set():
    with pytest.raises(ValueError, match="non-empty"):
        patch_whitening_basis(np.zeros((0, 32, 32, 3), np.uint8), Normalization((0.5,) * 3, (0.25,) * 3))


@pytest.mark.parametrize("arch", list_models())
def test_whitened_model_keeps_its_shape_and_parameter_count(arch):
    torch.manual_seed(0)
    model = create_model(arch)
    before = sum(p.numel() for p in model.parameters())
    images = smooth_images(64)
    conv = whiten_first_conv(model, images, Normalization.from_images(images))
    assert conv is first_conv(model) and parametrize.is_parametrized(conv, "weight")
    assert sum(p.numel() for p in model.parameters()) == before  # 64x27 learnt = 64x3x3x3 replaced
    assert conv.weight.shape == (64, 3, 3, 3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="already whitened"):
        whiten_first_conv(model, images, Normalization.from_images(images))


def test_parametrised_weight_is_latent_times_basis_and_gets_the_gradient():
    basis = torch.linalg.qr(torch.randn(27, 27)).Q * 3
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    target = conv.weight.detach().clone()
    parametrize.register_parametrization(conv, "weight", PatchWhitening(basis, conv.weight.shape))
    # right_inverse found the latent that reproduces the original weight
    assert torch.allclose(conv.weight, target, atol=1e-5)
    latent = conv.parametrizations.weight.original
    assert latent.shape == (8, 27)
    x = torch.randn(2, 3, 8, 8)
    out = conv(x)
    assert torch.allclose(out, F.conv2d(x, (latent @ basis).view(8, 3, 3, 3), padding=1), atol=1e-5)
    out.square().sum().backward()
    assert latent.grad is not None and latent.grad.abs().sum() > 0
    assert copy.deepcopy(conv).weight.shape == (8, 3, 3, 3)  # EMA copies the model


def test_fit_with_whitening_trains_and_stores_the_basis():
    splits = load_splits("synthetic:256:64", val_size=64, seed=0).with_train_subset(128, seed=0)
    config = TrainConfig(epochs=3, batch_size=64, max_lr=0.05, eval_batch_size=64, precision="fp32", whiten=True,
                         ema=0.9)
    result = fit(config, splits)
    losses = [r.train_loss for r in result.records]
    assert losses[-1] < losses[0], losses
    keys = result.model.state_dict().keys()
    assert "prep.0.parametrizations.weight.original" in keys and "prep.0.parametrizations.weight.0.basis" in keys
