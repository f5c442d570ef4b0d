"""Where a method's teacher outputs come from: one interface, chosen by `teacher_source.kind` in the experiment.

`InProcessTeacherSource` runs the teachers in the training process (the way torchdistill does): the baseline
that the served path is measured against.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from services.engine import TeacherEngine
from services.zoo import Teacher
from trainer.methods.base import TeacherInfo, TeacherOutputs


class TeacherSource(ABC):
    """Teacher outputs for batches of uint8 images, teachers in the experiment's order."""

    @abstractmethod
    def describe(self, image_size: int) -> list[TeacherInfo]:
        """What methods may know before training: classes and tap shapes for images of `image_size`."""

    @abstractmethod
    def fetch(self, images: torch.Tensor, wanted: Sequence[Sequence[str]]) -> TeacherOutputs:
        """Outputs for uint8 images [B, C, H, W]; `wanted[i]` names teacher i's outputs ([] skips it)."""

    @abstractmethod
    def counters(self) -> dict[str, int]:
        """Running totals for the run summary (teacher calls, cache hits and misses where there is a cache)."""

    def close(self) -> None:
        """Release what the source holds (connections, devices)."""


class InProcessTeacherSource(TeacherSource):
    def __init__(self, teachers: Sequence[Teacher], device: str | torch.device = "cpu") -> None:
        self.engines = [TeacherEngine(t, device) for t in teachers]

    def describe(self, image_size: int) -> list[TeacherInfo]:
        return [TeacherInfo(name=e.spec.name, num_classes=e.spec.num_classes,
                            feature_shapes=e.feature_shapes(image_size)) for e in self.engines]

    def fetch(self, images: torch.Tensor, wanted: Sequence[Sequence[str]]) -> TeacherOutputs:
        logits, features = [], []
        for engine, outputs in zip(self.engines, wanted, strict=True):
            result = engine.infer(images, list(outputs)) if outputs else {}
            logits.append(result.get("logits"))
            features.append({k: v for k, v in result.items() if k != "logits"})
        return TeacherOutputs(logits=logits, features=features)

    def counters(self) -> dict[str, int]:
        return {"teacher_calls": sum(e.calls for e in self.engines)}
