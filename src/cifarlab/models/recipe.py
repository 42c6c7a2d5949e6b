"""The architecture as the recipe builds it: its layers (activation, ghost batch norm, frozen batch-norm scales,
the whitened first conv) and, on the CPU, its conv kernels. Training, the LR range test, the benchmark and a
stored model's reader all build it here."""

from __future__ import annotations

import torch
from torch import nn

from cifarlab.config import TrainConfig
from cifarlab.keep import memo
from cifarlab.models.layers import use_activation, use_ghost_batch_norm
from cifarlab.models.registry import create_model
from cifarlab.whitening import whiten_first_conv


def recipe_model(config: TrainConfig, num_classes: int) -> nn.Module:
    """``config.arch`` with the recipe's layers, on the CPU: what ``studies.train`` prints as the layer table."""
    model = create_model(config.arch, num_classes=num_classes)
    use_activation(model, config.activation)
    if config.ghost_batch:
        use_ghost_batch_norm(model, config.ghost_batch)
    if config.bn_scale == "frozen":
        freeze_bn_scales(model)
    return model


def build_model(config: TrainConfig, splits, norm, device: torch.device, channels_last: bool) -> nn.Module:
    """The model ``config`` trains on ``device``: the recipe's layers, the first conv whitened from ``splits``'
    training images. With ``--compile``, the model object this process compiled for the same shape, loaded with the
    new weights: its compiled graph (and CUDA graphs, which hold its tensors' addresses) then serves this run too."""
    model = recipe_model(config, splits.num_classes).to(device)
    if config.whiten:
        whiten_first_conv(model, splits.train_images, norm)
    model = model.to(memory_format=torch.channels_last) if channels_last else model
    if not config.compile:
        return model
    shape = (config.arch, splits.num_classes, config.activation, config.ghost_batch, config.bn_scale, config.whiten,
             config.batch_size, str(device), channels_last)
    kept = memo("model of a compiled shape", shape, lambda: model)
    if kept is not model:
        kept.load_state_dict(model.state_dict())  # copies into the kept tensors: their addresses stay
    return kept


def freeze_bn_scales(model: nn.Module) -> int:
    """Fix every batch norm's scale at 1 (not learnt): Page's "frozen batch-norm scales". Returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
            with torch.no_grad():
                module.weight.fill_(1.0)
            module.weight.requires_grad_(False)
            count += 1
    return count
