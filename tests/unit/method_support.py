"""Helpers shared by the method tests: teacher descriptions, a fixed-logits student, a plain softmax, unit BN
scales."""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer.methods.base import TeacherInfo


def teacher_infos(count: int, num_classes: int = 10, feature_shapes: dict | None = None) -> list[TeacherInfo]:
    return [
        TeacherInfo(name=f"teacher{i}", num_classes=num_classes, feature_shapes=dict(feature_shapes or {}))
        for i in range(count)
    ]


class FixedLogits(nn.Module):
    """A stand-in student whose logits are a learnable tensor, whatever the images."""

    def __init__(self, logits: list[list[float]]) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits


def softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    """Plain-Python softmax, for hand-computed expected values."""
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def unit_bn_scales(module: nn.Module) -> None:
    """timm zero-initialises each residual branch's last BN scale, which stops the gradient of the conv before
    it on the first step; unit scales let a one-step check see every path."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
