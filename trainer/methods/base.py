"""The contract every distillation method implements, and what it receives from the teachers.

A method is an `nn.Module` that owns its student(s) and any training-only modules (gates, transforms,
adaptation layers). The training loop knows nothing about any particular method: it asks the method what it
needs from the teachers, hands it a batch, and steps the optimizer on the loss it returns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from services.formats.quantized_logits import quantized
from services.formats.soft_labels import CompactLogits, compress
from trainer.students import StudentConfig


@dataclass(frozen=True)
class TeacherInfo:
    """What a method may know about teacher i before training: enough to size its layers."""

    name: str
    num_classes: int
    # tap name -> its shape for one of the dataset's images, as the teacher gives it: (C, H, W) for a map
    feature_shapes: dict[str, tuple[int, ...]]


@dataclass
class TeacherOutputs:
    """Teacher outputs for one batch, in the configured teacher order; float32, on the student's device."""

    # Per teacher: [B, classes] or its compact form (services/formats/soft_labels.py); None where not asked.
    logits: list[torch.Tensor | CompactLogits | None]
    features: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per teacher: tap -> [B, C, H, W]

    def to(self, device: torch.device | str) -> TeacherOutputs:
        return TeacherOutputs(
            logits=[
                None
                if t is None
                else t.to(device, non_blocking=True)
                if isinstance(t, CompactLogits)
                else t.to(device, torch.float32, non_blocking=True)
                for t in self.logits
            ],
            features=[
                {k: v.to(device, torch.float32, non_blocking=True) for k, v in f.items()}
                for f in self.features
            ],
        )


def in_soft_label_form(outputs: TeacherOutputs, form: str) -> TeacherOutputs:
    """`outputs` with dense logits turned into the compact form when `form` is "compact", or quantized when
    it is "quantized" (exactly the values a compact or quantized cache entry decodes to); a source that
    already returns compact logits passes through."""
    if form == "compact":
        logits: list[torch.Tensor | CompactLogits | None] = [
            t if t is None or isinstance(t, CompactLogits) else compress(t) for t in outputs.logits
        ]
    elif form == "quantized":
        # Quantizing decoded quantized logits gives them back: a cached or served value passes unchanged.
        logits = [t if t is None or isinstance(t, CompactLogits) else quantized(t) for t in outputs.logits]
    else:
        return outputs
    return TeacherOutputs(logits=logits, features=outputs.features)


@dataclass(frozen=True)
class TrainingClock:
    """Where training stands; `epoch` is fractional (epoch 2.5 = halfway through the third epoch)."""

    epoch: float
    total_epochs: int


@dataclass
class LossResult:
    loss: torch.Tensor
    # Named parts of the loss, detached and on the loss's device: the training loop sums them there and reads
    # them once per epoch, so that no step waits for the device.
    terms: dict[str, torch.Tensor]
    # The batch's scores [B, classes] from this step's forward, whose argmax is the method's prediction (what
    # `predict` scores, in training mode): the loop counts train accuracy from them, with no second forward.
    scores: torch.Tensor


class Method(nn.Module, ABC):
    """Base class for distillation methods. Subclasses set `name` and implement the abstract methods."""

    name: str = ""
    #: Number of consecutive training stages (FEED sequential trains one stage per teacher).
    num_stages: int = 1
    #: Label smoothing of every hard-label CE term; the training session sets it from `train.label_smoothing`.
    label_smoothing: float = 0.0

    def hard_label_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """CE(logits, y), the labels smoothed by `label_smoothing`: every method's hard-label term."""
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)

    def forward(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        teachers: TeacherOutputs | None,
        clock: TrainingClock,
    ) -> LossResult:
        """The training step's loss; `forward` so that a DistributedDataParallel wrapper sees every step."""
        return self.training_loss(images, labels, teachers, clock)

    def teacher_outputs(self) -> list[list[str]]:
        """Per teacher, the outputs this method needs ("logits" and/or tap names). Empty: no teachers."""
        return []

    @abstractmethod
    def training_loss(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        teachers: TeacherOutputs | None,
        clock: TrainingClock,
    ) -> LossResult:
        """The loss for one batch of normalized student inputs and, when the method uses them, teacher
        outputs."""

    @abstractmethod
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Scores [B, classes] whose argmax is the method's prediction (what is evaluated and deployed)."""

    @abstractmethod
    def exported_students(self) -> dict[str, nn.Module]:
        """The networks a user deploys after training, by name; training-only modules are not in them.
        Whatever the results table measures is among them (an ensemble's combined prediction too)."""

    def headline(self) -> str:
        """The exported student whose prediction is the method's (`predict`): its accuracy is the result's.
        Methods exporting several override it."""
        (name,) = self.exported_students()
        return name

    def alone_networks(self) -> dict[str, StudentConfig]:
        """Per exported single network, the same network as a student config: what trains alone with CE as
        the baseline its gain is measured against (trainer.results.baselines). Ensembles have none."""
        return {}

    def param_groups(self, lr: float) -> list[dict]:
        """Optimizer parameter groups; override where some parameters need their own learning rate."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    def set_stage(self, stage: int) -> None:
        """Enter training stage `stage` (0-based); only multi-stage methods override it."""
        if stage != 0:
            raise ValueError(f"{self.name} has a single training stage, asked for stage {stage}")
