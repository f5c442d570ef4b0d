"""Multi-branch trunks (EKD, ONE, OKD): a stem and the first stages shared by every branch, the remaining
stages and a classifier copied once per branch, each copy at its own width.

Two trunks with one interface (`MultiBranchTrunk`: `forward_branches`, `export_branch`, the mean of the branch
logits as `forward`): a CIFAR ResNet (`MultiBranchResNet`, three stages of basic blocks) and a timm ImageNet
ResNet (`ImageNetMultiBranchResNet`, four stages of basic or bottleneck blocks). A method's params choose one
through `MultiBranchTrunkParams`.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal, cast

import timm
import torch
from pydantic import AfterValidator, BaseModel, Field, model_validator
from timm.models import ResNet
from timm.models.resnet import BasicBlock as TimmBasicBlock
from timm.models.resnet import Bottleneck
from torch import nn

from services.teachers.cifar_models import (
    CIFAR_RESNET_WIDTHS,
    BasicBlock,
    init_weights,
    make_stage,
    scaled_width,
)
from trainer.students.cifar import CifarResNetDepth
from trainer.students.registry import STUDENTS, StudentConfig


@dataclass
class BranchOutputs:
    """What a multi-branch trunk computes for one batch."""

    shared: torch.Tensor  # output of the shared part (ONE's gate reads it)
    logits: list[torch.Tensor]  # one [B, classes] per branch
    stage_features: list[list[torch.Tensor]]  # per branch, the output of each of its own stages


class Branch(nn.Module):
    """The unshared stages of a ResNet plus a classifier, at one width."""

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


class MultiBranchTrunk(nn.Module, ABC):
    """`stem` and `shared` run once; every branch runs its own stages and classifier on their output."""

    def __init__(
        self,
        stem: nn.Module,
        shared: nn.Module,
        shared_channels: int,
        branches: Sequence[Branch],
        branch_widths: Sequence[float],
        branch_stage_channels: Sequence[Sequence[int]],
    ) -> None:
        super().__init__()
        if len(branches) < 1:
            raise ValueError("a multi-branch trunk needs at least one branch")
        self.stem = stem
        self.shared = shared
        self.branches = nn.ModuleList(branches)
        self.shared_channels = shared_channels
        self.branch_widths = tuple(branch_widths)
        #: per branch, the output channels of each of its own stages (OKD's adaptation layers read them)
        self.branch_stage_channels = [list(channels) for channels in branch_stage_channels]

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

    def branch(self, index: int) -> Branch:
        """Branch `index`, as built from `branches` (nn.ModuleList types its items as plain Modules)."""
        return cast(Branch, self.branches[index])

    def export_branch(self, index: int) -> nn.Module:
        """Branch `index` as a standalone network (stem + shared stages + its own stages and classifier)."""
        return SingleBranchNet(self.stem, self.shared, self.branch(index))

    @abstractmethod
    def alone_network(self, index: int) -> StudentConfig:
        """The student config of a network with the layers of `export_branch(index)`, to train alone."""


class SingleBranchNet(nn.Module):
    """One branch of a multi-branch trunk, deployable alone."""

    def __init__(self, stem: nn.Module, shared: nn.Module, branch: Branch) -> None:
        super().__init__()
        self.stem, self.shared, self.branch = stem, shared, branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(self.shared(self.stem(x)))[0]


class MultiBranchResNet(MultiBranchTrunk):
    """A CIFAR ResNet whose stem and first `shared_stages` stages are shared and whose remaining stages and
    classifier are copied once per branch, branch i at width `branch_widths[i]` (channels rounded).

    shared_stages=2 is ONE's layout (conv1, layer1, layer2 shared; layer3 per branch); shared_stages=0 is
    online ensemble compression's (only conv1+BN+ReLU shared, at full width, as BOC-KD's `BaseNet`).
    """

    def __init__(
        self,
        depth: int,
        num_classes: int,
        branch_widths: Sequence[float],
        shared_stages: int = 2,
        in_chans: int = 3,
    ) -> None:
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, 56, 110, ...), got {depth}")
        if not 0 <= shared_stages <= 2:
            raise ValueError(
                "shared_stages must be 0, 1 or 2 (at least the last stage is per branch), "
                f"got {shared_stages}"
            )
        blocks = (depth - 2) // 6
        strides = (1, 2, 2)
        c1 = CIFAR_RESNET_WIDTHS[0]
        stem = nn.Sequential(nn.Conv2d(in_chans, c1, 3, 1, 1, bias=False), nn.BatchNorm2d(c1), nn.ReLU())
        shared, prev = [], c1
        for i in range(shared_stages):
            shared.append(make_stage(BasicBlock, prev, CIFAR_RESNET_WIDTHS[i], blocks, strides[i]))
            prev = CIFAR_RESNET_WIDTHS[i]
        branches, stage_channels = [], []
        for width in branch_widths:
            stages, in_c, channels = nn.ModuleList(), prev, []
            for i in range(shared_stages, 3):
                out_c = scaled_width(CIFAR_RESNET_WIDTHS[i], width)
                stages.append(make_stage(BasicBlock, in_c, out_c, blocks, strides[i]))
                channels.append(out_c)
                in_c = out_c
            branches.append(Branch(stages, in_c, num_classes))
            stage_channels.append(channels)
        super().__init__(stem, nn.Sequential(*shared), prev, branches, branch_widths, stage_channels)
        self.depth, self.shared_stage_count = depth, shared_stages
        init_weights(self)

    def alone_network(self, index: int) -> StudentConfig:
        width = self.branch_widths[index]
        arch = f"cifar_resnet{self.depth}"
        if width == 1.0:
            return StudentConfig(arch=arch)
        if self.shared_stage_count == 0:
            return StudentConfig(arch=arch, options={"width": width, "full_width_stem": True})
        raise ValueError(
            f"branch {index} (width {width} after {self.shared_stage_count} full-width shared stages) has no "
            "single CIFAR ResNet equivalent"
        )


class ImageNetMultiBranchResNet(MultiBranchTrunk):
    """A timm ImageNet ResNet (`arch`: resnet18, resnet34, resnet50, ...; basic or bottleneck blocks) whose
    stem (conv1, bn1, act1, maxpool) and first `shared_stages` of its four stages are shared and whose
    remaining stages and classifier are copied once per branch.

    Branch i's stages have `int(planes × branch_widths[i])` planes (a bottleneck's output is 4× its planes),
    truncated as online ensemble compression's code (BOC-KD) does; the shared stages keep their full width.
    Every part is timm's own module, initialised as timm initialises it.
    """

    def __init__(
        self,
        arch: str,
        num_classes: int,
        branch_widths: Sequence[float],
        shared_stages: int = 3,
        in_chans: int = 3,
    ) -> None:
        if not 0 <= shared_stages <= 3:
            raise ValueError(
                "shared_stages must be 0, 1, 2 or 3 (at least the last of 4 stages is per branch), "
                f"got {shared_stages}"
            )
        full = timm.create_model(arch, num_classes=num_classes, in_chans=in_chans)
        if not isinstance(full, ResNet):
            raise ValueError(f"{arch!r} is not a timm ResNet")
        stage_names = [f"layer{s + 1}" for s in range(4)]
        first_block = full.get_submodule("layer1.0")
        if not isinstance(first_block, (TimmBasicBlock, Bottleneck)):
            raise ValueError(f"{arch!r} is not a timm ResNet of basic or bottleneck blocks")
        expansion = first_block.expansion
        # feature_info: the stem's output, then each stage's (timm's own record of the channel counts, in
        # dicts whose values it leaves untyped)
        stage_outputs = [cast(int, info["num_chs"]) for info in full.feature_info]
        planes = [channels // expansion for channels in stage_outputs[1:]]
        stem = nn.Sequential(
            OrderedDict(conv1=full.conv1, bn1=full.bn1, act1=full.act1, maxpool=full.maxpool)
        )
        shared = nn.Sequential(
            OrderedDict((name, getattr(full, name)) for name in stage_names[:shared_stages])
        )
        shared_channels = stage_outputs[shared_stages]
        branches, stage_channels, branch_planes = [], [], []
        for width in branch_widths:
            channels = tuple(p if s < shared_stages else max(1, int(p * width)) for s, p in enumerate(planes))
            branch_planes.append(list(channels))
            # A whole timm ResNet at these channels, of which the branch keeps the unshared stages: timm
            # builds every variant's blocks (attention, anti-aliasing, avg-down shortcuts) and their init.
            copy = timm.create_model(arch, num_classes=num_classes, in_chans=in_chans, channels=channels)
            assert isinstance(copy, ResNet)  # the architecture of `full`
            own = nn.ModuleList(getattr(copy, name) for name in stage_names[shared_stages:])
            branches.append(Branch(own, copy.num_features, num_classes))
            stage_channels.append([c * expansion for c in channels[shared_stages:]])
        super().__init__(stem, shared, shared_channels, branches, branch_widths, stage_channels)
        self.arch, self.branch_planes = arch, branch_planes

    def alone_network(self, index: int) -> StudentConfig:
        if self.branch_widths[index] == 1.0:
            return StudentConfig(arch=f"timm:{self.arch}")
        return StudentConfig(arch=f"timm:{self.arch}", options={"channels": self.branch_planes[index]})


TrunkName = Literal["cifar_resnet", "imagenet_resnet"]


def _timm_resnet(arch: str) -> str:
    resnets = timm.list_models(module="resnet")
    if arch not in resnets:
        close = difflib.get_close_matches(arch, resnets, n=5)
        hint = (
            f"close matches: {', '.join(close)}" if close else "e.g. resnet18, resnet34, resnet50, resnet101"
        )
        raise ValueError(f"{arch!r} is not a timm ResNet architecture; {hint}")
    return arch


class MultiBranchTrunkParams(BaseModel):
    """The trunk fields of a multi-branch method's params: a CIFAR ResNet of `depth`, or timm's ImageNet
    ResNet `arch`. Each method says which stages its branches copy."""

    trunk: TrunkName = Field(
        "cifar_resnet",
        description="cifar_resnet: a CIFAR ResNet of `depth` (3 stages of basic blocks); "
        "imagenet_resnet: timm's ImageNet ResNet `arch` (4 stages, basic or bottleneck blocks)",
    )
    default_depth: ClassVar[int] = 20  # a method's own default CIFAR depth overrides this
    depth: CifarResNetDepth | None = Field(
        None, description="CIFAR ResNet depth, 6n+2 (trunk cifar_resnet; None: the method's default)"
    )
    arch: Annotated[str, AfterValidator(_timm_resnet)] | None = Field(
        None,
        description="timm ResNet architecture, e.g. resnet18 or resnet50 (trunk imagenet_resnet; default "
        "resnet50)",
    )

    @model_validator(mode="after")
    def _fields_of_the_chosen_trunk(self) -> MultiBranchTrunkParams:
        # The other trunk's field must stay unset (None), so that a dump of the params validates again.
        if self.trunk == "cifar_resnet":
            if self.arch is not None:
                raise ValueError("arch does not apply to trunk 'cifar_resnet', which is sized by depth")
            self.depth = self.default_depth if self.depth is None else self.depth
        else:
            if self.depth is not None:
                raise ValueError("depth does not apply to trunk 'imagenet_resnet', which is sized by arch")
            self.arch = "resnet50" if self.arch is None else self.arch
        return self

    def build_trunk(
        self, *, num_classes: int, in_chans: int, branch_widths: Sequence[float], shared_stages: int
    ) -> MultiBranchTrunk:
        # _fields_of_the_chosen_trunk set the chosen trunk's field.
        if self.trunk == "cifar_resnet":
            assert self.depth is not None
            return MultiBranchResNet(
                self.depth, num_classes, branch_widths, shared_stages=shared_stages, in_chans=in_chans
            )
        assert self.arch is not None
        return ImageNetMultiBranchResNet(
            self.arch, num_classes, branch_widths, shared_stages=shared_stages, in_chans=in_chans
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
