"""Knowledge distillation of Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network",
from one teacher or the average of several.

Loss (docs/methods.md, "Hinton KD"):

    L = λ·CE(s, y) + (1−λ)·T²·KL(p̄^T ‖ p_s^T),   p̄^T = Σ_i w_i·softmax(t_i / T)

The target averages the teachers' softened probabilities, not their logits (as MEAL-V2 does); the two differ.
Weights w_i default to equal and are normalized to sum to one. CE uses the raw student logits; KL is
batchmean. Defaults T=4, λ=alpha=0.5. This equals torchdistill 1.1.5's
`KDLoss(alpha=λ, beta=1−λ, reduction='batchmean')`, except that torchdistill drops the T²·KL term when alpha
is 0 and ekd does not special-case that.

The helpers `check_teachers`, `require_teacher_logits` and `TeacherWeights` are the teacher checks every
logit-distilling method here shares.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from torch import nn

from services.core.contract import LOGITS
from services.core.errors import ConfigError
from trainer.methods.base import LossResult, Method, TeacherInfo, TeacherOutputs, TrainingClock
from trainer.methods.losses import TeacherLogits, hinton_kd_loss, soft_targets
from trainer.methods.registry import register_method
from trainer.students import StudentConfig


def _valid_teacher_weights(weights: list[float] | None) -> list[float] | None:
    if weights is not None and (any(w < 0 for w in weights) or sum(weights) <= 0):
        raise ValueError(f"teacher_weights must be non-negative with a positive sum, got {weights}")
    return weights


#: Optional per-teacher weights of the averaged soft target, in teacher order; None means equal weights.
TeacherWeights = Annotated[list[float] | None, AfterValidator(_valid_teacher_weights)]


def check_teachers(
    method: str,
    teachers: list[TeacherInfo],
    num_classes: int,
    *,
    min_teachers: int,
    teacher_weights: list[float] | None = None,
) -> None:
    """Raise ValueError unless there are at least `min_teachers` teachers, all predicting `num_classes`
    classes, and `teacher_weights` (when given) has one weight per teacher."""
    if len(teachers) < min_teachers:
        raise ConfigError(f"{method} needs at least {min_teachers} teacher(s), got {len(teachers)}")
    for teacher in teachers:
        if teacher.num_classes != num_classes:
            raise ConfigError(
                f"{method}: teacher {teacher.name!r} predicts {teacher.num_classes} classes, "
                f"the student {num_classes}; they must be equal"
            )
    if teacher_weights is not None and len(teacher_weights) != len(teachers):
        raise ConfigError(
            f"{method}: {len(teacher_weights)} teacher_weights for {len(teachers)} teachers; "
            "give one weight per teacher or none"
        )


def require_teacher_logits(
    method: str, teachers: TeacherOutputs | None, num_teachers: int
) -> list[TeacherLogits]:
    """The teachers' logits for this batch, checked to hold one tensor per configured teacher."""
    received = [] if teachers is None else [t for t in teachers.logits if t is not None]
    if teachers is None or len(teachers.logits) != num_teachers or len(received) != num_teachers:
        got = "none" if teachers is None else f"{len(received)} of {len(teachers.logits)}"
        raise ValueError(
            f"{method} needs the logits of its {num_teachers} teacher(s) for every batch, got {got}"
        )
    return received


class KDParams(BaseModel):
    """Hinton KD from one teacher or the (weighted) average of several teachers' softened probabilities."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["kd"] = "kd"
    student: StudentConfig = Field(default_factory=StudentConfig, description="the student network")
    temperature: float = Field(4.0, gt=0, description="softmax temperature T of the soft targets")
    alpha: float = Field(0.5, ge=0, le=1, description="weight λ of the hard-label CE; the KD term gets 1−λ")
    teacher_weights: TeacherWeights = Field(
        None, description="per-teacher weights of the averaged soft target (normalized); None: equal"
    )


class KnowledgeDistillation(Method):
    name = "kd"

    def __init__(
        self,
        student: nn.Module,
        num_teachers: int,
        temperature: float,
        alpha: float,
        teacher_weights: list[float] | None,
        student_config: StudentConfig | None = None,
    ) -> None:
        super().__init__()
        self.student = student
        self.student_config = student_config  # what built `student`: its CE baseline trains the same
        self.num_teachers = num_teachers
        self.temperature = temperature
        self.alpha = alpha
        self.teacher_weights = teacher_weights

    def teacher_outputs(self) -> list[list[str]]:
        return [[LOGITS] for _ in range(self.num_teachers)]

    def training_loss(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        teachers: TeacherOutputs | None,
        clock: TrainingClock,
    ) -> LossResult:
        teacher_logits = require_teacher_logits(self.name, teachers, self.num_teachers)
        logits = self.student(images)
        target = soft_targets(teacher_logits, self.temperature, self.teacher_weights, logits)
        loss, terms = hinton_kd_loss(
            logits, labels, target, self.temperature, self.alpha, self.label_smoothing
        )
        return LossResult(loss, terms, logits.detach())

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(images)

    def exported_students(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def alone_networks(self) -> dict[str, StudentConfig]:
        return {} if self.student_config is None else {"student": self.student_config}


@register_method(KDParams, uses_teachers=True)
def build_kd(params: KDParams, *, num_classes: int, in_chans: int, teachers: list[TeacherInfo]) -> Method:
    check_teachers("kd", teachers, num_classes, min_teachers=1, teacher_weights=params.teacher_weights)
    student = params.student.build(num_classes, in_chans)
    return KnowledgeDistillation(
        student, len(teachers), params.temperature, params.alpha, params.teacher_weights, params.student
    )
