"""The method registry: what each method registers about itself, and the one door that builds a method.

A method module registers its builder with `@register_method(ParamsClass, uses_teachers=...)`. The params
class (a pydantic model whose `name: Literal[...]` field is the method's name) is the method's config section,
so the experiment schema, the teacher checks and the demo all read the registry instead of listing methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel

from services.core.errors import ConfigError
from services.core.registry import Registry
from trainer.methods.base import Method, TeacherInfo

MethodBuilder = Callable[..., Method]  # builder(params, *, num_classes, in_chans, teachers) -> Method


class MethodParams(Protocol):
    """Any registered method's params, as code that does not know which method sees them: the `name` field
    (a Literal of the method's name) and pydantic's dump. The schema's union of them is assembled from the
    registry at import time (trainer.config.MethodConfig), so the type checker sees this instead."""

    @property
    def name(self) -> str: ...

    def model_dump(self, *, mode: str = ...) -> dict[str, Any]: ...


@dataclass(frozen=True)
class MethodEntry:
    name: str
    params: type[BaseModel]  # the config section; its `name` field is a Literal of `name`
    build: MethodBuilder
    uses_teachers: bool  # distills from external teachers (else it learns from labels and its own parts)


METHODS: Registry[MethodEntry] = Registry("method")


def register_method(
    params: type[BaseModel], *, uses_teachers: bool
) -> Callable[[MethodBuilder], MethodBuilder]:
    """Register `builder(params, *, num_classes, in_chans, teachers) -> Method` under `params`'s name."""
    name = params.model_fields["name"].default
    if not isinstance(name, str) or not name:
        raise TypeError(f"{params.__name__} needs a `name: Literal[...]` field with its default set")

    def decorate(builder: MethodBuilder) -> MethodBuilder:
        METHODS.add(name, MethodEntry(name, params, builder, uses_teachers))
        return builder

    return decorate


def create_method(
    params: MethodParams, *, num_classes: int, in_chans: int, teachers: list[TeacherInfo]
) -> Method:
    """Build the method named by `params.name` from its validated params, for these teachers."""
    entry = METHODS.get(params.name)
    if entry.uses_teachers and not teachers:
        raise ConfigError(f"method {entry.name!r} distills from teachers: list at least one under `teachers`")
    if not entry.uses_teachers and teachers:
        raise ConfigError(
            f"method {entry.name!r} uses no external teachers, got {len(teachers)} "
            f"({', '.join(t.name for t in teachers)}); configure none"
        )
    return entry.build(params, num_classes=num_classes, in_chans=in_chans, teachers=teachers)
