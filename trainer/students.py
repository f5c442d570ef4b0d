"""Student architectures: width-scaled CIFAR ResNets, small CNNs, and multi-branch trunks.

One registry, one door: `create_student(arch, num_classes, **kwargs)`. Multi-branch trunks (EKD, ONE, OKD)
share the first stages of a CIFAR ResNet and copy the rest once per branch, each copy at its own width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from torch import nn

from services.cifar_models import (
    CIFAR_RESNET_WIDTHS,
    BasicBlock,
    CifarResNet,
    init_weights,
    make_stage,
    scaled_width,
)
from services.errors import ConfigError
from services.registry import Registry

STUDENTS: Registry[Callable[..., nn.Module]] = Registry("student architecture")


def _cifar_resnet_depth(depth: int) -> int:
    if (depth - 2) % 6 != 0:
        raise ValueError(f"depth must be 6n+2 (8, 14, 20, 32, 56, 110, ...), got {depth}")
    return depth


#: A CIFAR ResNet depth (6n+2) in a method's params, validated where the config is read.
CifarResNetDepth = Annotated[int, Field(ge=8), AfterValidator(_cifar_resnet_depth)]


def create_student(arch: str, num_classes: int, **kwargs) -> nn.Module:
    return STUDENTS.get(arch)(num_classes=num_classes, **kwargs)


class StudentConfig(BaseModel):
    """One student network: a registered architecture and its keyword options."""

    model_config = ConfigDict(extra="forbid")

    arch: str = Field("cifar_resnet8", description="registered student architecture (see `STUDENTS`)")
    options: dict[str, Any] = Field(
        default_factory=dict, description="keyword options of the architecture, e.g. {width: 0.5}"
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        STUDENTS.get(arch)
        return arch

    def build(self, num_classes: int, in_chans: int) -> nn.Module:
        try:
            return create_student(self.arch, num_classes, in_chans=in_chans, **self.options)
        except (TypeError, ValueError) as err:  # an option the architecture does not take, or a bad value
            raise ConfigError(f"student {self.arch!r} rejected options {self.options}: {err}") from None


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


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


@dataclass
class BranchOutputs:
    """What a multi-branch trunk computes for one batch."""

    shared: torch.Tensor  # output of the shared part (ONE's gate reads it)
    logits: list[torch.Tensor]  # one [B, classes] per branch
    stage_features: list[list[torch.Tensor]]  # per branch, the output of each of its own stages


class Branch(nn.Module):
    """The unshared stages of a CIFAR ResNet plus a classifier, at one width."""

    def __init__(self, stages: nn.ModuleList, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.stages = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return self.fc(torch.flatten(self.pool(x), 1)), features


class MultiBranchResNet(nn.Module):
    """A CIFAR ResNet whose stem and first `shared_stages` stages are shared and whose remaining stages and
    classifier are copied once per branch, branch i at width `branch_widths[i]`.

    shared_stages=2 is ONE's layout (conv1, layer1, layer2 shared; layer3 per branch); shared_stages=0 is
    online ensemble compression's (only conv1+BN+ReLU shared).
    """

    def __init__(
        self,
        depth: int,
        num_classes: int,
        branch_widths: Sequence[float],
        shared_stages: int = 2,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, 56, 110, ...), got {depth}")
        if not 0 <= shared_stages <= 2:
            raise ValueError(
                "shared_stages must be 0, 1 or 2 (at least the last stage is per branch), "
                f"got {shared_stages}"
            )
        if len(branch_widths) < 1:
            raise ValueError("a multi-branch trunk needs at least one branch")
        blocks = (depth - 2) // 6
        strides = (1, 2, 2)
        c1 = CIFAR_RESNET_WIDTHS[0]
        self.stem = nn.Sequential(nn.Conv2d(in_chans, c1, 3, 1, 1, bias=False), nn.BatchNorm2d(c1), nn.ReLU())
        shared, prev = [], c1
        for i in range(shared_stages):
            shared.append(make_stage(BasicBlock, prev, CIFAR_RESNET_WIDTHS[i], blocks, strides[i]))
            prev = CIFAR_RESNET_WIDTHS[i]
        self.shared = nn.Sequential(*shared)
        self.shared_channels = prev
        self.branches = nn.ModuleList()
        for width in branch_widths:
            stages, in_c = nn.ModuleList(), prev
            for i in range(shared_stages, 3):
                out_c = scaled_width(CIFAR_RESNET_WIDTHS[i], width)
                stages.append(make_stage(BasicBlock, in_c, out_c, blocks, strides[i]))
                in_c = out_c
            self.branches.append(Branch(stages, in_c, num_classes))
        self.branch_widths = tuple(branch_widths)
        init_weights(self)

    @property
    def num_branches(self) -> int:
        return len(self.branches)

    def forward_branches(self, x: torch.Tensor) -> BranchOutputs:
        shared = self.shared(self.stem(x))
        logits, features = [], []
        for branch in self.branches:
            z, f = branch(shared)
            logits.append(z)
            features.append(f)
        return BranchOutputs(shared=shared, logits=logits, stage_features=features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain ensemble prediction: the mean of the branch logits."""
        return torch.stack(self.forward_branches(x).logits).mean(0)

    def export_branch(self, index: int) -> nn.Module:
        """Branch `index` as a standalone network (stem + shared stages + its own stages and classifier)."""
        return SingleBranchNet(self.stem, self.shared, self.branches[index])


class SingleBranchNet(nn.Module):
    """One branch of a multi-branch trunk, deployable alone."""

    def __init__(self, stem: nn.Module, shared: nn.Module, branch: Branch) -> None:
        super().__init__()
        self.stem, self.shared, self.branch = stem, shared, branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(self.shared(self.stem(x)))[0]


def _cifar_resnet(depth: int):
    def build(num_classes: int, width: float = 1.0, in_chans: int = 3) -> nn.Module:
        return CifarResNet(depth, num_classes, width=width, in_chans=in_chans)

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


@STUDENTS.decorator()
def multi_branch_resnet(
    num_classes: int,
    depth: int = 20,
    branch_widths: Sequence[float] = (1.0, 1.0, 1.0),
    shared_stages: int = 2,
    in_chans: int = 3,
) -> nn.Module:
    return MultiBranchResNet(
        depth, num_classes, branch_widths, shared_stages=shared_stages, in_chans=in_chans
    )
