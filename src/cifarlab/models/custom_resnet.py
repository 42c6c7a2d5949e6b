"""The seed's custom ResNet (the DAWNBench "ResNet-9" shape): 6,573,120 parameters for 10 classes.

prep 64 -> layer1 128 (+ residual) -> layer2 256 -> layer3 512 (+ residual) -> max-pool 4 -> linear.
"""

from __future__ import annotations

import torch
from torch import nn

from cifarlab.models.registry import register_model


def conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    """3x3 conv (no bias: BN follows), optional 2x2 max-pool, BN, ReLU; pool before BN as the seed has it."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class Residual(nn.Module):
    """x + f(x), where f is two conv-BN-ReLU blocks at constant width."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.res = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res(x)


class CustomResNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.prep = conv_bn(3, 64)  # 64x32x32
        self.layer1 = nn.Sequential(conv_bn(64, 128, pool=True), Residual(128))  # 128x16x16
        self.layer2 = conv_bn(128, 256, pool=True)  # 256x8x8
        self.layer3 = nn.Sequential(conv_bn(256, 512, pool=True), Residual(512))  # 512x4x4
        self.pool = nn.AdaptiveMaxPool2d(1)  # the seed's MaxPool2d(4) on 4x4, robust to other sizes
        self.fc = nn.Linear(512, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model
def custom_resnet(num_classes: int = 10) -> nn.Module:
    return CustomResNet(num_classes)
