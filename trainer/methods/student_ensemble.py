"""An ensemble of small students (Dewalkar, Sinha, Patidar): N small networks, each distilled alone from the
teacher(s), combined at test time by majority vote.

Per student i (docs/methods.md, "Ensemble of small students"), with cross-entropies as the paper writes it:

    L_i = λ·H(y, p_{s_i}) + (1−λ)·H(p̄^T, p_{s_i}^T),   p̄^T = Σ_j w_j·softmax(t_j / T)

and the total loss Σ_i L_i. The students share no parameters, so the gradient of the sum with respect to
student i is the gradient of L_i alone: summing is the same as training each student on its own, on the same
batches. Defaults are the paper's best MNIST setting, T=10 and λ=0.75.

Choices ekd made where the source is silent:
- The soft term has no T² by default, exactly as the paper writes the loss (and as its best setting, T=10 with
  λ=0.75, was tuned). `soft_term_t2: true` multiplies it by T² as Hinton et al. do, which keeps the soft
  gradients' scale independent of T (without it they shrink by 1/T², 1/100 at T=10). H(p̄^T, p_s^T) differs
  from KL(p̄^T ‖ p_s^T) only by the teachers' entropy, a constant for the student; the logged value is the
  cross-entropy itself, as the paper writes it.
- Several teachers are averaged in probability, as in `kd` (optional weights).
- Default students: three small CNNs differing in conv channels, kernel size (3 or 5) and FC width, the axes
  the paper varies; the paper trains many and keeps the best N, which here is the user's choice of list.
- combine="vote" (default, the paper's evaluation): each student votes for its argmax; the returned scores are
  vote counts plus half the students' averaged probabilities, so the argmax is the majority class and ties
  are broken by the averaged probabilities (a remaining exact tie goes to the lowest class index).
  combine="average": the mean of the students' probabilities.

The combined prediction is exported too (`ensemble_vote` or `ensemble_average`: the students in one module
whose output is these scores) and is the method's headline; each student is exported on its own, with the
same small network trained alone with CE as its baseline.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from services.core.contract import LOGITS
from trainer.methods.base import LossResult, Method, TeacherInfo, TeacherOutputs, TrainingClock
from trainer.methods.kd import TeacherWeights, check_teachers, require_teacher_logits
from trainer.methods.losses import soft_targets
from trainer.methods.registry import register_method
from trainer.students import StudentConfig

Combine = Literal["vote", "average"]


def _default_students() -> list[StudentConfig]:
    return [
        StudentConfig(arch="small_cnn", options={"channels": [8, 16], "kernel_size": 3, "fc_width": 32}),
        StudentConfig(arch="small_cnn", options={"channels": [16, 32], "kernel_size": 5, "fc_width": 64}),
        StudentConfig(arch="small_cnn", options={"channels": [12, 24], "kernel_size": 3, "fc_width": 128}),
    ]


class StudentEnsembleParams(BaseModel):
    """N small students, each distilled alone from the teacher(s); prediction by majority vote or average."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["student_ensemble"] = "student_ensemble"
    students: list[StudentConfig] = Field(
        default_factory=_default_students,
        min_length=2,
        description="the small students (at least 2), e.g. small_cnn with "
        "different channels, kernel_size and fc_width",
    )
    temperature: float = Field(10.0, gt=0, description="softmax temperature T of the soft targets")
    alpha: float = Field(0.75, ge=0, le=1, description="weight λ of the hard-label CE; the soft CE gets 1−λ")
    teacher_weights: TeacherWeights = Field(
        None, description="per-teacher weights of the averaged soft target (normalized); None: equal"
    )
    soft_term_t2: bool = Field(
        False,
        description="multiply the soft cross-entropy by T² (Hinton's scaling); "
        "off: the paper's loss as written",
    )
    combine: Combine = Field(
        "vote",
        description="how the students' predictions combine: majority 'vote' "
        "(ties: averaged probabilities) or 'average' probabilities",
    )


def soft_cross_entropy(
    student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float, t2_scale: bool = False
) -> torch.Tensor:
    """H(target, softmax(s/T)), batch-averaged, the paper's soft cross-entropy; × T² when `t2_scale`."""
    return F.cross_entropy(student_logits / temperature, target_probs) * (temperature**2 if t2_scale else 1.0)


def combine_predictions(student_logits: list[torch.Tensor], combine: Combine) -> torch.Tensor:
    """Scores [B, classes] whose argmax is the ensemble's prediction (the rules: the module docstring)."""
    mean_probs = torch.stack([F.softmax(z, dim=1) for z in student_logits]).mean(0)
    if combine == "average":
        return mean_probs
    votes = torch.zeros_like(mean_probs)
    for z in student_logits:
        votes.scatter_add_(1, z.argmax(1, keepdim=True), torch.ones_like(votes[:, :1]))
    # Averaged probabilities lie in [0, 1]; halved they break ties but never outweigh one vote.
    return votes + 0.5 * mean_probs


class CombinedStudents(nn.Module):
    """The students as one deployable network: scores whose argmax is the ensemble's prediction."""

    def __init__(self, students: nn.ModuleList, combine: Combine) -> None:
        super().__init__()
        self.students = students
        self.combine = combine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return combine_predictions([student(x) for student in self.students], self.combine)


class StudentEnsemble(Method):
    name = "student_ensemble"

    def __init__(
        self,
        students: list[nn.Module],
        num_teachers: int,
        temperature: float,
        alpha: float,
        teacher_weights: list[float] | None,
        combine: Combine,
        soft_term_t2: bool,
        student_configs: list[StudentConfig] | None = None,
    ) -> None:
        super().__init__()
        self.student_configs = student_configs  # what built `students`: their CE baselines train the same
        self.soft_term_t2 = soft_term_t2
        self.students = nn.ModuleList(students)
        self.num_teachers = num_teachers
        self.temperature = temperature
        self.alpha = alpha
        self.teacher_weights = teacher_weights
        self.combine = combine

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
        total = images.new_zeros(())
        terms: dict[str, torch.Tensor] = {}
        every_logits = []
        for i, student in enumerate(self.students):
            logits = student(images)
            every_logits.append(logits.detach())
            # Per student: a compact teacher's tail is spread as this student's softmax spreads it.
            target = soft_targets(teacher_logits, self.temperature, self.teacher_weights, logits)
            hard = self.hard_label_loss(logits, labels)
            soft = soft_cross_entropy(logits, target, self.temperature, self.soft_term_t2)
            total = total + self.alpha * hard + (1.0 - self.alpha) * soft
            terms[f"ce_{i}"] = hard.detach()
            terms[f"soft_ce_{i}"] = soft.detach()
        return LossResult(total, terms, combine_predictions(every_logits, self.combine))

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return combine_predictions([student(images) for student in self.students], self.combine)

    def headline(self) -> str:
        return f"ensemble_{self.combine}"

    def exported_students(self) -> dict[str, nn.Module]:
        students: dict[str, nn.Module] = {f"student_{i}": student for i, student in enumerate(self.students)}
        students[self.headline()] = CombinedStudents(self.students, self.combine)
        return students

    def alone_networks(self) -> dict[str, StudentConfig]:
        if self.student_configs is None:
            return {}
        return {f"student_{i}": config for i, config in enumerate(self.student_configs)}


@register_method(StudentEnsembleParams, uses_teachers=True)
def build_student_ensemble(
    params: StudentEnsembleParams, *, num_classes: int, in_chans: int, teachers: list[TeacherInfo]
) -> Method:
    check_teachers(
        "student_ensemble", teachers, num_classes, min_teachers=1, teacher_weights=params.teacher_weights
    )
    students = [config.build(num_classes, in_chans) for config in params.students]
    return StudentEnsemble(
        students,
        len(teachers),
        params.temperature,
        params.alpha,
        params.teacher_weights,
        params.combine,
        params.soft_term_t2,
        params.students,
    )
