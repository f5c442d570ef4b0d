"""The student registry, its one door `create_student`, and `StudentConfig`, the config of one student.

An architecture is either registered in `STUDENTS` (ekd's own networks, added by the modules of this
package as they are imported) or any timm architecture, named `timm:<name>`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from services.core.errors import ConfigError, UnknownNameError, UserError
from services.core.registry import Registry
from trainer.students.initial_weights import load_initial_weights
from trainer.students.timm_students import TIMM_PREFIX, check_timm_arch, create_timm_student

STUDENTS: Registry[Callable[..., nn.Module]] = Registry("student architecture")


def check_student_arch(arch: str) -> None:
    """Raise `UnknownNameError` unless `arch` is registered or a known `timm:<name>`."""
    if arch.startswith(TIMM_PREFIX):
        check_timm_arch(arch)
    elif arch not in STUDENTS:
        raise UnknownNameError(
            f"unknown student architecture {arch!r}; available: {', '.join(STUDENTS.names())}, "
            f"or any timm architecture as '{TIMM_PREFIX}<name>'"
        )


def create_student(arch: str, num_classes: int, **kwargs) -> nn.Module:
    """Build student `arch` (registered, or `timm:<name>`) for `num_classes` with its keyword options."""
    check_student_arch(arch)
    if arch.startswith(TIMM_PREFIX):
        return create_timm_student(arch, num_classes, **kwargs)
    return STUDENTS.get(arch)(num_classes=num_classes, **kwargs)


class StudentConfig(BaseModel):
    """One student network: an architecture, its keyword options and optionally its initial weights."""

    model_config = ConfigDict(extra="forbid")

    arch: str = Field(
        "cifar_resnet8",
        description="registered student architecture (see `STUDENTS`), or any timm architecture as "
        "'timm:<name>' (e.g. timm:resnet50, timm:mobilenetv3_large_100)",
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="keyword options of the architecture, e.g. {width: 0.5}"
    )
    init_checkpoint: str | None = Field(
        None,
        description="local file of initial weights (services.core.weights.read_state_dict): safetensors, "
        "or a torch state dict read with weights_only=True, bare or nested as timm saves it, in the "
        "architecture's own key layout (timm's; torchvision's ResNets share it); a "
        "classifier over another number of classes is re-initialised. None: random initialisation",
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        check_student_arch(arch)
        return arch

    def build(self, num_classes: int, in_chans: int) -> nn.Module:
        try:
            student = create_student(self.arch, num_classes, in_chans=in_chans, **self.options)
        except UserError:
            raise
        except (TypeError, ValueError) as err:  # an option the architecture does not take, or a bad value
            raise ConfigError(f"student {self.arch!r} rejected options {self.options}: {err}") from None
        if self.init_checkpoint is not None:
            load_initial_weights(
                student, Path(self.init_checkpoint), field="init_checkpoint", architecture=self.arch
            )
        return student


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
