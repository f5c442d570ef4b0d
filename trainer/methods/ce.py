"""Supervised baseline: the student trained on the labels alone, L = CE(s, y).

Not a distillation method: it is the reference every distillation result is compared with, and the step that
trains ekd's own teachers when no pretrained checkpoint exists.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from trainer.methods.base import (
    LossResult,
    Method,
    TeacherInfo,
    TeacherOutputs,
    TrainingClock,
)
from trainer.methods.registry import register_method
from trainer.students import StudentConfig


class CEParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["ce"] = "ce"
    student: StudentConfig = Field(default_factory=StudentConfig, description="the network trained on labels")


class CrossEntropyTraining(Method):
    name = "ce"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_loss(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        teachers: TeacherOutputs | None,
        clock: TrainingClock,
    ) -> LossResult:
        logits = self.model(images)
        ce = self.hard_label_loss(logits, labels)
        return LossResult(ce, {"ce": ce.detach()}, logits.detach())

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def exported_students(self) -> dict[str, nn.Module]:
        return {"student": self.model}


@register_method(CEParams, uses_teachers=False)
def build_ce(params: CEParams, *, num_classes: int, in_chans: int, teachers: list[TeacherInfo]) -> Method:
    return CrossEntropyTraining(params.student.build(num_classes, in_chans))
