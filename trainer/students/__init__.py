"""Student networks: one registry (`STUDENTS`), one door (`create_student`), one config (`StudentConfig`).

- `registry`: the registry, the door and the config; `count_parameters`.
- `timm_students`: every timm architecture as `timm:<name>`.
- `initial_weights`: a student's initial weights from a local safetensors or torch file.
- `cifar`: ekd's own small students (width-scaled CIFAR ResNets, small CNNs).
- `pruning`: ResNet-50 with its filters pruned by L1 norm (`resnet50_l1_pruned`).
- `multi_branch`: the multi-branch trunks of EKD, ONE and OKD, from CIFAR or ImageNet ResNets.

Importing this package registers every architecture of its modules.
"""

from __future__ import annotations

from trainer.students.cifar import CifarResNetDepth, SmallCNN
from trainer.students.multi_branch import (
    Branch,
    BranchOutputs,
    ImageNetMultiBranchResNet,
    MultiBranchResNet,
    MultiBranchTrunk,
    MultiBranchTrunkParams,
    SingleBranchNet,
)
from trainer.students.pruning import l1_kept_filters
from trainer.students.registry import STUDENTS, StudentConfig, count_parameters, create_student

__all__ = [
    "STUDENTS",
    "Branch",
    "BranchOutputs",
    "CifarResNetDepth",
    "ImageNetMultiBranchResNet",
    "MultiBranchResNet",
    "MultiBranchTrunk",
    "MultiBranchTrunkParams",
    "SingleBranchNet",
    "SmallCNN",
    "StudentConfig",
    "count_parameters",
    "create_student",
    "l1_kept_filters",
]
