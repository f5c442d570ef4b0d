"""ekd's own small students: width-scaled CIFAR ResNets and the small CNNs of Dewalkar et al."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import AfterValidator, Field
from torch import nn

from services.teachers.cifar_models import CifarResNet, init_weights
from trainer.students.registry import STUDENTS


def _cifar_resnet_depth(depth: int) -> int:
    if (depth - 2) % 6 != 0:
        raise ValueError(f"depth must be 6n+2 (8, 14, 20, 32, 56, 110, ...), got {depth}")
    return depth


#: A CIFAR ResNet depth (6n+2) in a method's params, validated where the config is read.
CifarResNetDepth = Annotated[int, Field(ge=8), AfterValidator(_cifar_resnet_depth)]


class SmallCNN(nn.Module):
    """Two conv-BN-ReLU-pool blocks and a two-layer classifier (the small MNIST students of Dewalkar et al.).

    Students in an ensemble differ in conv channels, kernel size (3 or 5) and FC width.
    """

    def __init__(
        self,
        num_classes: int,
        channels: Sequence[int] = (16, 32),
        kernel_size: int = 3,
        fc_width: int = 64,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        layers: list[nn.Module] = []
        prev = in_chans
        for c in channels:
            layers += [
                nn.Conv2d(prev, c, kernel_size, 1, kernel_size // 2, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            prev = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(prev * 4, fc_width), nn.ReLU(), nn.Linear(fc_width, num_classes)
        )
        self.num_features = prev
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cifar_resnet(depth: int):
    def build(
        num_classes: int, width: float = 1.0, in_chans: int = 3, full_width_stem: bool = False
    ) -> nn.Module:
        return CifarResNet(
            depth, num_classes, width=width, in_chans=in_chans, full_width_stem=full_width_stem
        )

    build.__name__ = f"cifar_resnet{depth}"
    build.__doc__ = f"CIFAR ResNet-{depth} (He et al. 2016), width-scaled."
    return build


for _depth in (8, 14, 20, 32, 56, 110):
    STUDENTS.add(f"cifar_resnet{_depth}", _cifar_resnet(_depth))


@STUDENTS.decorator()
def small_cnn(
    num_classes: int,
    channels: Sequence[int] = (16, 32),
    kernel_size: int = 3,
    fc_width: int = 64,
    in_chans: int = 3,
) -> nn.Module:
    return SmallCNN(
        num_classes, channels=channels, kernel_size=kernel_size, fc_width=fc_width, in_chans=in_chans
    )
