"""CIFAR-style networks that neither torchvision nor timm ships: the ResNet of He et al. (2016, depth 6n+2)
and the Wide ResNet of Zagoruyko & Komodakis (2016, depth 6n+4, widen factor k).

Both are written as stem -> three stages -> pool -> classifier, with the stages exposed as `layer1..layer3`
so that feature taps, shared trunks and width scaling address them by name.
"""

from __future__ import annotations

import torch
from torch import nn

CIFAR_RESNET_WIDTHS = (16, 32, 64)


def scaled_width(channels: int, width: float) -> int:
    """Channel count of a width-scaled layer, truncated as online ensemble compression's code (BOC-KD)
    truncates it (`int(channels * width)`: 12, not 13, of 64 at width 0.2); never below one channel."""
    return max(1, int(channels * width))


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; a 1x1 projection shortcut whenever shape changes (He et al. option B)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class WideBasicBlock(nn.Module):
    """Pre-activation wide block (BN-ReLU-conv twice), as in the WRN paper."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = self.shortcut(out) if not isinstance(self.shortcut, nn.Identity) else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + shortcut


def make_stage(
    block: type[nn.Module], in_channels: int, out_channels: int, blocks: int, stride: int
) -> nn.Sequential:
    layers = [block(in_channels, out_channels, stride)]
    layers += [block(out_channels, out_channels, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32-class inputs; `width` scales every layer's channels (1.0: the paper's
    16/32/64), the stem's too unless `full_width_stem` (online ensemble compression's students keep the
    shared 16-channel stem at every width)."""

    def __init__(
        self,
        depth: int,
        num_classes: int,
        width: float = 1.0,
        in_chans: int = 3,
        full_width_stem: bool = False,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, 56, 110, ...), got {depth}")
        blocks = (depth - 2) // 6
        c1, c2, c3 = (scaled_width(c, width) for c in CIFAR_RESNET_WIDTHS)
        c0 = CIFAR_RESNET_WIDTHS[0] if full_width_stem else c1
        self.stem = nn.Sequential(nn.Conv2d(in_chans, c0, 3, 1, 1, bias=False), nn.BatchNorm2d(c0), nn.ReLU())
        self.layer1 = make_stage(BasicBlock, c0, c1, blocks, 1)
        self.layer2 = make_stage(BasicBlock, c1, c2, blocks, 2)
        self.layer3 = make_stage(BasicBlock, c2, c3, blocks, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)
        self.num_features = c3
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer3(self.layer2(self.layer1(self.stem(x))))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(features), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class CifarWideResNet(nn.Module):
    """WRN-(6n+4)-k for 32x32-class inputs (no dropout).

    The blocks are pre-activation, so layer3's output has not been through a BN-ReLU yet; `final_act`
    applies the network's last one, and a feature tap of the last stage reads `final_act`'s output (the
    map the classifier pools, Factor Transfer's and FEED's convention)."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int, in_chans: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"Wide ResNet depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {depth}")
        blocks = (depth - 4) // 6
        c0, (c1, c2, c3) = 16, (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.stem = nn.Conv2d(in_chans, c0, 3, 1, 1, bias=False)
        self.layer1 = make_stage(WideBasicBlock, c0, c1, blocks, 1)
        self.layer2 = make_stage(WideBasicBlock, c1, c2, blocks, 2)
        self.layer3 = make_stage(WideBasicBlock, c2, c3, blocks, 2)
        self.bn = nn.BatchNorm2d(c3)
        self.final_act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)
        self.num_features = c3
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_act(self.bn(self.layer3(self.layer2(self.layer1(self.stem(x))))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.forward_features(x)), 1))
