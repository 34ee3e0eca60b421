"""ResNet backbones (He et al., 2016) with the CIFAR stem (3x3 stride-1 conv, no max-pool) or the ImageNet stem.

Written here rather than taken from torchvision so the package needs only torch (torchvision wheels do not
import beside every torch build we support). The output is the global-average-pooled feature, (B, 8 * width).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastmice.core.errors import ConfigError

# name -> blocks per stage (BasicBlock everywhere: 18/34 are the paper's; "small" is for CPU-sized runs).
ARCHS: dict[str, tuple[int, int, int, int]] = {
    "resnet34": (3, 4, 6, 3),
    "resnet18": (2, 2, 2, 2),
    "resnet10": (1, 1, 1, 1),
}


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, arch: str = "resnet34", stem: str = "cifar", width: int = 64, in_channels: int = 3):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' (32 px images) or 'imagenet' (96 px and up), got {stem!r}")
        if stem == "cifar":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1))
        stages, c_in = [], width
        for i, n_blocks in enumerate(ARCHS[arch]):
            c_out = width * 2 ** i
            blocks = [BasicBlock(c_in if b == 0 else c_out, c_out, 2 if (b == 0 and i > 0) else 1)
                      for b in range(n_blocks)]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.out_dim = c_in
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:       # (B, 3, H, W) -> (B, 8 * width)
        x = self.stages(self.stem(x))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


@dataclass
class BackboneConfig:
    """The `backbone:` section: the ResNet every method's student (and teacher) is built on."""
    arch: str = "resnet34"          # resnet34 (paper) | resnet18 | resnet10
    stem: str = "cifar"             # cifar: 3x3 stride-1 conv, no max-pool; imagenet: 7x7/2 + max-pool (96 px)
    width: int = 64                 # channels of the first stage

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"backbone.arch={self.arch!r} is not one of {sorted(ARCHS)}")
        if self.stem not in ("cifar", "imagenet"):
            raise ConfigError(f"backbone.stem must be 'cifar' or 'imagenet', got {self.stem!r}")
        if self.width < 1:
            raise ConfigError(f"backbone.width must be positive, got {self.width}")


def build_backbone(cfg: BackboneConfig) -> ResNet:
    return ResNet(cfg.arch, cfg.stem, cfg.width)
