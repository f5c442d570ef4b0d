"""FEED: Feature-level Ensemble for Knowledge Distillation (Park & Kwak, ECAI 2020), parallel and
sequential.

FEED extends Factor Transfer (FT; Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression via
Factor Transfer", NeurIPS 2018) to several teachers. The student's last-stage feature map F_s goes through one
non-linear transform per teacher (FT's "translator"), and each transform learns to match its teacher's
feature map; the transforms exist only during training, so the deployed student costs nothing extra.

    L = CE(s, y) + β · Σ_i ‖ n(T_i(F_s)) − n(F_{t_i}) ‖₁,     n(x) = flatten(x) / ‖flatten(x)‖₂ per sample

The L1 term is reduced as FT's code reduces it: each sample's flattened map is L2-normalized, then the
absolute differences are averaged over batch and elements; the teacher side is a detached target.

- Parallel FEED (`mode="parallel"`): one stage, all teachers at once, one transform each.
- Sequential FEED (`mode="sequential"`): one stage per teacher; stage k trains the student left by stage
  k−1 (the same module continues) with teacher k and transform k only; the other transforms are frozen.

Defaults: parallel, cifar_resnet8 student, teacher tap "layer3", β = 500 (FT's), logit KD off (T = 4 when
on), paraphraser off (rate k = 0.5 when on, FT's). Any student with `forward_features` (returning a map
[B, C, H, W]), `forward_head` and `num_features` serves: ekd's CIFAR nets and small CNNs, and timm's
convolutional networks (`timm:resnet50`, `resnet50_l1_pruned`, ...), whose F_s is the output of their last
stage before pooling.

The teacher maps are last-stage maps after the network's final BN-ReLU, FT's convention (its teachers'
features are the pooled map): the pre-activation wide ResNets expose `layer3` there (`final_act`), the
post-activation CIFAR ResNets' `layer3` already ends in one.

ekd's reading, where the sources leave a choice:
- Transform i has FT's translator layout: three 3×3 convs (stride 1, padding 1, with bias, no BN), each
  followed by LeakyReLU(0.1), channels C_s → C_s → C_t → C_t, with C_t teacher i's channel count at
  `teacher_tap`. (FT's translator ends at the factor's k·C_t channels; without a paraphraser the factor is
  the teacher map itself.) Where the spatial sizes differ, the transform output is adaptively
  average-pooled to the teacher map's (H, W).
- The feature terms are summed over teachers, not averaged, as the equation writes them.
- Optional logit KD: `kd_weight · T² · KL(p̄_t^T ‖ p_s^T)` (trainer.methods.losses), p̄ averaging the softened
  probabilities of the current stage's teachers (all of them in parallel mode, teacher k in stage k).
- Optional paraphraser (`paraphraser=True`): per teacher, FT's convolutional autoencoder (encoder: 3×3 convs
  C_t → C_t → k·C_t → k·C_t; decoder: 3×3 transposed convs back to C_t; LeakyReLU(0.1) after every layer).
  The target factor is the encoder output, detached, and the transform ends at k·C_t channels. FT pretrains
  the paraphraser on the teacher map with an L1 reconstruction loss and then freezes it; ekd trains it online
  with the same loss on the detached teacher map, added to the total, so that one training run from one
  config covers it. The factor the paraphraser hands over is detached, so its only gradient is its
  reconstruction loss: adding that loss equals FT's separate paraphraser optimizer at the same lr.
"""

from __future__ import annotations

from typing import Literal, Protocol, cast

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from services.core.contract import LOGITS
from services.core.errors import ConfigError
from trainer.methods.base import LossResult, Method, TeacherInfo, TeacherOutputs, TrainingClock
from trainer.methods.losses import distillation_kl, soft_targets
from trainer.methods.registry import register_method
from trainer.students import StudentConfig

_LEAKY_SLOPE = 0.1  # FT's LeakyReLU slope in both the translator and the paraphraser


class FeatureStudent(Protocol):
    """What FEED calls on its student besides nn.Module's methods: timm's split of the forward pass, which
    build_feed checks the student has."""

    @property
    def num_features(self) -> int: ...

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward_head(self, x: torch.Tensor) -> torch.Tensor: ...


class FeedParams(BaseModel):
    """Config section of FEED (`method.name: feed`)."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["feed"] = "feed"
    mode: Literal["parallel", "sequential"] = Field(
        "parallel", description="parallel: all teachers in one stage; sequential: one stage per teacher"
    )
    student: StudentConfig = Field(
        default_factory=StudentConfig,
        description="the student network; needs forward_features (a feature map), forward_head and "
        "num_features, as ekd's CIFAR nets and timm's convolutional networks (timm:<name>) have",
    )
    teacher_tap: str = Field(
        "layer3", min_length=1, description="teacher feature map to match; every teacher must expose it"
    )
    beta: float = Field(500.0, ge=0.0, description="weight β of the factor (normalized L1) terms; FT's 500")
    kd_weight: float = Field(0.0, ge=0.0, description="weight of the optional logit-KD term; 0 turns it off")
    temperature: float = Field(4.0, gt=0.0, description="temperature T of the optional logit-KD term")
    paraphraser: bool = Field(
        False, description="match FT paraphraser factors (trained online) instead of raw maps"
    )
    paraphrase_rate: float = Field(
        0.5, gt=0.0, description="FT's paraphrase rate k: factor channels = round(k · C_t)"
    )


def normalized_l1(student_factor: torch.Tensor, teacher_factor: torch.Tensor) -> torch.Tensor:
    """FT's factor loss: mean |n(s) − n(t)|, n L2-normalizing each sample's flattened map; t is a target."""
    student_vec = F.normalize(student_factor.flatten(1), dim=1)
    teacher_vec = F.normalize(teacher_factor.detach().flatten(1), dim=1)
    return F.l1_loss(student_vec, teacher_vec)


def _conv_leaky(in_channels: int, out_channels: int, transposed: bool = False) -> list[nn.Module]:
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    return [conv(in_channels, out_channels, 3, 1, 1, bias=True), nn.LeakyReLU(_LEAKY_SLOPE)]


class Translator(nn.Sequential):
    """FT's student-side transform: three 3×3 conv + LeakyReLU(0.1), channels C_s → C_s → C_out → C_out."""

    def __init__(self, student_channels: int, out_channels: int) -> None:
        super().__init__(
            *_conv_leaky(student_channels, student_channels),
            *_conv_leaky(student_channels, out_channels),
            *_conv_leaky(out_channels, out_channels),
        )


class Paraphraser(nn.Module):
    """FT's teacher-side autoencoder: the encoder output is the teacher factor (k·C channels, same H×W)."""

    def __init__(self, channels: int, factor_channels: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            *_conv_leaky(channels, channels),
            *_conv_leaky(channels, factor_channels),
            *_conv_leaky(factor_channels, factor_channels),
        )
        self.decoder = nn.Sequential(
            *_conv_leaky(factor_channels, factor_channels, transposed=True),
            *_conv_leaky(factor_channels, channels, transposed=True),
            *_conv_leaky(channels, channels, transposed=True),
        )

    def forward(self, teacher_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(factor, L1 reconstruction loss of the detached teacher map)."""
        target = teacher_map.detach()
        factor = self.encoder(target)
        return factor, F.l1_loss(self.decoder(factor), target)


class FeatureEnsembleDistillation(Method):
    """A student plus one training-only transform (and optionally a paraphraser) per teacher."""

    name = "feed"

    def __init__(self, student: nn.Module, teachers: list[TeacherInfo], params: FeedParams) -> None:
        super().__init__()
        self.student = student
        self.params = params
        self.teacher_names = [t.name for t in teachers]
        self.teacher_channels = [t.feature_shapes[params.teacher_tap][0] for t in teachers]
        factor_channels = [
            max(1, round(c * params.paraphrase_rate)) if params.paraphraser else c
            for c in self.teacher_channels
        ]
        student_channels = cast(FeatureStudent, student).num_features
        self.transforms = nn.ModuleList(Translator(student_channels, c) for c in factor_channels)
        self.paraphrasers = None
        if params.paraphraser:
            self.paraphrasers = nn.ModuleList(
                Paraphraser(c, f) for c, f in zip(self.teacher_channels, factor_channels)
            )
        self.num_stages = len(teachers) if params.mode == "sequential" else 1
        self.stage = 0
        self.set_stage(0)

    def _active_teachers(self) -> list[int]:
        """Indices of the teachers (and their transforms) that the current stage trains with."""
        return [self.stage] if self.params.mode == "sequential" else list(range(len(self.teacher_names)))

    def _stage_modules(self, index: int) -> list[nn.Module]:
        paraphraser = [] if self.paraphrasers is None else [self.paraphrasers[index]]
        return [self.transforms[index], *paraphraser]

    def set_stage(self, stage: int) -> None:
        if not 0 <= stage < self.num_stages:
            raise ValueError(
                f"feed ({self.params.mode}) has stages 0..{self.num_stages - 1}, asked for stage {stage}"
            )
        self.stage = stage
        active = set(self._active_teachers())
        # Freezing the other stages' modules keeps them out of any gradient (and out of DDP's buckets).
        for i in range(len(self.teacher_names)):
            for module in self._stage_modules(i):
                module.requires_grad_(i in active)

    def teacher_outputs(self) -> list[list[str]]:
        wanted = [self.params.teacher_tap] + ([LOGITS] if self.params.kd_weight > 0 else [])
        active = set(self._active_teachers())
        return [list(wanted) if i in active else [] for i in range(len(self.teacher_names))]

    def param_groups(self, lr: float) -> list[dict]:
        """The student and the current stage's transforms (and paraphrasers): a fresh optimizer per stage."""
        params = list(self.student.parameters())
        for i in self._active_teachers():
            for module in self._stage_modules(i):
                params += list(module.parameters())
        return [{"params": params, "lr": lr}]

    def _teacher_map(self, teachers: TeacherOutputs, index: int) -> torch.Tensor:
        tap, name = self.params.teacher_tap, self.teacher_names[index]
        if index >= len(teachers.features) or tap not in teachers.features[index]:
            raise ValueError(
                f"feed needs teacher {name!r}'s feature map {tap!r}, which the batch does not hold"
            )
        teacher_map = teachers.features[index][tap]
        if teacher_map.dim() != 4 or teacher_map.shape[1] != self.teacher_channels[index]:
            raise ValueError(
                f"teacher {name!r}'s map {tap!r} has shape {tuple(teacher_map.shape)}; expected "
                f"[B, {self.teacher_channels[index]}, H, W]"
            )
        return teacher_map

    def training_loss(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        teachers: TeacherOutputs | None,
        clock: TrainingClock,
    ) -> LossResult:
        if teachers is None:
            raise ValueError("feed needs teacher feature maps; got no teacher outputs")
        student = cast(FeatureStudent, self.student)
        features = student.forward_features(images)
        if features.dim() != 4:
            raise ConfigError(
                "feed transforms the student's feature map [B, C, H, W], but its forward_features returns "
                f"shape {list(features.shape)} (a transformer's tokens?); choose a convolutional student"
            )
        logits = student.forward_head(features)
        ce = self.hard_label_loss(logits, labels)
        loss, terms = ce, {"ce": ce.detach()}
        active = self._active_teachers()
        factor_total = features.new_zeros(())
        for i in active:
            target = self._teacher_map(teachers, i)
            if self.paraphrasers is not None:
                target, reconstruction = self.paraphrasers[i](target)
                loss = loss + reconstruction
                terms[f"reconstruction/{self.teacher_names[i]}"] = reconstruction.detach()
            student_factor = self.transforms[i](features)
            if student_factor.shape[-2:] != target.shape[-2:]:
                height, width = target.shape[-2:]
                student_factor = F.adaptive_avg_pool2d(student_factor, (height, width))
            factor = normalized_l1(student_factor, target)
            terms[f"factor/{self.teacher_names[i]}"] = factor.detach()
            factor_total = factor_total + factor
        loss = loss + self.params.beta * factor_total
        terms["factor"] = factor_total.detach()
        if self.params.kd_weight > 0:
            teacher_logits = [teachers.logits[i] for i in active]
            received = [t for t in teacher_logits if t is not None]
            if len(received) != len(teacher_logits):
                raise ValueError("feed's logit KD needs the logits of the stage's teachers for every batch")
            target_probs = soft_targets(received, self.params.temperature, student_logits=logits)
            kd = distillation_kl(logits, target_probs, self.params.temperature)
            loss = loss + self.params.kd_weight * kd
            terms["kd"] = kd.detach()
        return LossResult(loss=loss, terms=terms, scores=logits.detach())

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(images)

    def exported_students(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def alone_networks(self) -> dict[str, StudentConfig]:
        return {"student": self.params.student}


@register_method(FeedParams, uses_teachers=True)
def build_feed(params: FeedParams, *, num_classes: int, in_chans: int, teachers: list[TeacherInfo]) -> Method:
    if not teachers:
        raise ConfigError("feed needs at least one teacher, got none")
    for teacher in teachers:
        if not teacher.feature_shapes:
            raise ConfigError(f"feed matches teacher feature maps, but teacher {teacher.name!r} exposes none")
        if params.teacher_tap not in teacher.feature_shapes:
            raise ConfigError(
                f"teacher_tap {params.teacher_tap!r} is not a feature map of teacher "
                f"{teacher.name!r}; available: {', '.join(sorted(teacher.feature_shapes))}"
            )
        if params.kd_weight > 0 and teacher.num_classes != num_classes:
            raise ConfigError(
                f"kd_weight > 0 needs teachers over the student's {num_classes} classes; "
                f"teacher {teacher.name!r} has {teacher.num_classes}"
            )
    student = params.student.build(num_classes, in_chans)
    missing = [a for a in ("forward_features", "forward_head", "num_features") if not hasattr(student, a)]
    if missing:
        raise ConfigError(
            f"feed needs a student exposing forward_features, forward_head and num_features; "
            f"{params.student.arch!r} lacks {', '.join(missing)}"
        )
    return FeatureEnsembleDistillation(student, teachers, params)
