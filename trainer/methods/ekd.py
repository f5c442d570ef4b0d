"""Ensemble Knowledge Distillation (Asif, Tang, Harrer, 2019): a compact student with parallel branches, one
per teacher, trained with the labels and each branch's own teacher, the branches coupled by their ensemble.

Only the abstract is public; this is ekd's reading of it (docs/methods.md, "EKD"). The student is a ResNet
whose stem and first `shared_stages` stages are shared and whose remaining stages and classifier are copied
once per teacher, every branch at full width:
- `trunk: cifar_resnet` (default): a CIFAR ResNet of `depth`, 3 stages; by default the stem and layer1 are
  shared, layer2 and layer3 per branch (shared_stages 1).
- `trunk: imagenet_resnet`: timm's ImageNet ResNet `arch` (e.g. resnet50), 4 stages; by default the stem
  (conv1, bn1, ReLU, max-pool) and layer1–layer3 are shared and layer4 is copied per branch (shared_stages 3),
  so that the branches cost a last stage each rather than most of a ResNet-50.
With b_i the logits of branch i, t_i those of teacher i and b̄ = mean_i b_i:

    L = Σ_i [ λ·CE(b_i, y) + (1−λ)·T²·KL(softmax(t_i/T) ‖ softmax(b_i/T)) ]  +  CE(b̄, y)
        [ + β·Σ_i MSE(pool_i(A_i(F_{b_i})), F_{t_i}.detach()) ]

The per-branch "CE + KD" is the Hinton combination from `kd` (λ = alpha weighs the branch's CE, 1−λ its KD
term), so each branch sees exactly Hinton KD from its own teacher alone; the ensemble's CE carries weight 1.
Defaults: depth 20, shared_stages 1 (imagenet_resnet: 3), T=4, λ=0.5. Inference: the ensemble, the mean of the
branch logits (what `MultiBranchTrunk.forward` computes), exported whole as "ekd_student" (the headline);
each branch is exported too ("branch_i", stem and shared stages included), and its baseline is the same
network (a plain ResNet of `depth`, or timm's `arch`) trained alone with CE.

The bracketed feature term is off by default (feature_weight β=0, feature_tap None). When on, F_{b_i} is
branch i's last-stage map, A_i a 1×1 conv adapter (with bias) to teacher i's channel count at `feature_tap`,
pool_i an adaptive average pool to the teacher map's spatial size, and MSE is the mean over all elements. The
adapters train with the student and are not exported. Teacher maps larger than the student's are upsampled by
the same adaptive pooling (repetition).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, model_validator
from torch import nn

from services.core.contract import LOGITS
from services.core.errors import ConfigError
from trainer.methods.base import LossResult, Method, TeacherInfo, TeacherOutputs, TrainingClock
from trainer.methods.kd import check_teachers, require_teacher_logits
from trainer.methods.losses import hinton_kd_loss, soft_targets
from trainer.methods.registry import register_method
from trainer.students import MultiBranchTrunk, MultiBranchTrunkParams, StudentConfig

# Stages shared after the stem when the config leaves shared_stages out: CIFAR ResNets have 3 stages,
# ImageNet ResNets 4; the last stage is always per branch.
_DEFAULT_SHARED_STAGES = {"cifar_resnet": 1, "imagenet_resnet": 3}
_MAX_SHARED_STAGES = {"cifar_resnet": 2, "imagenet_resnet": 3}


class EKDParams(MultiBranchTrunkParams):
    """A multi-branch ResNet student, branch i distilled from teacher i, trained as an ensemble."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["ekd"] = "ekd"
    shared_stages: Annotated[int, Field(ge=0, le=3)] | None = Field(
        None,
        description="stages shared by all branches after the stem; None: 1 for cifar_resnet (of 3), "
        "3 for imagenet_resnet (of 4, layer4 per branch)",
    )
    temperature: float = Field(4.0, gt=0, description="softmax temperature T of each branch's KD term")
    alpha: float = Field(0.5, ge=0, le=1, description="weight λ of each branch's CE; its KD term gets 1−λ")
    feature_tap: str | None = Field(
        None, description="teacher feature tap matched by each branch's last-stage map; None: no feature term"
    )
    feature_weight: float = Field(0.0, ge=0, description="weight β of the per-branch feature MSE term")

    @model_validator(mode="after")
    def _shared_stages_of_the_trunk(self) -> EKDParams:
        if self.shared_stages is None:
            self.shared_stages = _DEFAULT_SHARED_STAGES[self.trunk]
        elif self.shared_stages > _MAX_SHARED_STAGES[self.trunk]:
            raise ValueError(
                f"shared_stages must be less than or equal to {_MAX_SHARED_STAGES[self.trunk]} for trunk "
                f"{self.trunk!r} (at least its last stage is per branch), got {self.shared_stages}"
            )
        return self

    @model_validator(mode="after")
    def _feature_term_complete(self) -> EKDParams:
        if (self.feature_tap is None) != (self.feature_weight == 0):
            raise ValueError(
                f"feature_tap={self.feature_tap!r} with feature_weight={self.feature_weight}: "
                "the feature term needs both a tap and a positive weight, or neither"
            )
        return self


class EnsembleKnowledgeDistillation(Method):
    name = "ekd"

    def __init__(
        self,
        student: MultiBranchTrunk,
        temperature: float,
        alpha: float,
        feature_tap: str | None,
        feature_weight: float,
        teacher_channels: list[int],
    ) -> None:
        super().__init__()
        self.student = student
        self.temperature = temperature
        self.alpha = alpha
        self.feature_tap = feature_tap
        self.feature_weight = feature_weight
        branch_channels = [student.branch(i).fc.in_features for i in range(student.num_branches)]
        self.adapters = nn.ModuleList(
            nn.Conv2d(c_in, c_out, kernel_size=1) for c_in, c_out in zip(branch_channels, teacher_channels)
        )

    def teacher_outputs(self) -> list[list[str]]:
        wanted = [LOGITS] if self.feature_tap is None else ["logits", self.feature_tap]
        return [list(wanted) for _ in range(self.student.num_branches)]

    def training_loss(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        teachers: TeacherOutputs | None,
        clock: TrainingClock,
    ) -> LossResult:
        teacher_logits = require_teacher_logits(self.name, teachers, self.student.num_branches)
        out = self.student.forward_branches(images)
        total = images.new_zeros(())
        terms: dict[str, torch.Tensor] = {}
        for i, (branch_logits, t) in enumerate(zip(out.logits, teacher_logits)):
            target = soft_targets([t], self.temperature, student_logits=branch_logits)
            branch_loss, branch_terms = hinton_kd_loss(
                branch_logits, labels, target, self.temperature, self.alpha, self.label_smoothing
            )
            total = total + branch_loss
            terms[f"ce_{i}"], terms[f"kd_{i}"] = branch_terms["ce"], branch_terms["kd"]
        ensemble = torch.stack(out.logits).mean(0)
        ensemble_ce = self.hard_label_loss(ensemble, labels)
        total = total + ensemble_ce
        terms["ce_ensemble"] = ensemble_ce.detach()
        if self.feature_tap is not None:
            assert teachers is not None  # require_teacher_logits raised otherwise
            teacher_maps = self._teacher_maps(teachers, self.feature_tap)
            for i, (branch_features, adapter, t_map) in enumerate(
                zip(out.stage_features, self.adapters, teacher_maps)
            ):
                height, width = t_map.shape[-2:]
                adapted = F.adaptive_avg_pool2d(adapter(branch_features[-1]), (height, width))
                feature_mse = F.mse_loss(adapted, t_map.detach())
                total = total + self.feature_weight * feature_mse
                terms[f"feature_{i}"] = feature_mse.detach()
        return LossResult(total, terms, ensemble.detach())

    def _teacher_maps(self, teachers: TeacherOutputs, tap: str) -> list[torch.Tensor]:
        if len(teachers.features) != self.student.num_branches or any(
            tap not in f for f in teachers.features
        ):
            raise ValueError(
                f"ekd needs feature map {tap!r} from each of its "
                f"{self.student.num_branches} teachers for every batch"
            )
        return [f[tap] for f in teachers.features]

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(images)

    def headline(self) -> str:
        return "ekd_student"

    def exported_students(self) -> dict[str, nn.Module]:
        students: dict[str, nn.Module] = {self.headline(): self.student}
        for index in range(self.student.num_branches):
            students[f"branch_{index}"] = self.student.export_branch(index)
        return students

    def alone_networks(self) -> dict[str, StudentConfig]:
        return {f"branch_{i}": self.student.alone_network(i) for i in range(self.student.num_branches)}


@register_method(EKDParams, uses_teachers=True)
def build_ekd(params: EKDParams, *, num_classes: int, in_chans: int, teachers: list[TeacherInfo]) -> Method:
    check_teachers("ekd", teachers, num_classes, min_teachers=2)
    teacher_channels: list[int] = []
    if params.feature_tap is not None:
        for teacher in teachers:
            if params.feature_tap not in teacher.feature_shapes:
                raise ConfigError(
                    f"ekd: teacher {teacher.name!r} has no feature tap {params.feature_tap!r}; "
                    f"its taps: {', '.join(sorted(teacher.feature_shapes)) or 'none'}"
                )
            teacher_channels.append(teacher.feature_shapes[params.feature_tap][0])
    assert params.shared_stages is not None  # _shared_stages_of_the_trunk set it
    student = params.build_trunk(
        num_classes=num_classes,
        in_chans=in_chans,
        branch_widths=[1.0] * len(teachers),
        shared_stages=params.shared_stages,
    )
    return EnsembleKnowledgeDistillation(
        student, params.temperature, params.alpha, params.feature_tap, params.feature_weight, teacher_channels
    )
