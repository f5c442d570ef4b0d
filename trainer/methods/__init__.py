"""Distillation methods: one module per method, one registry, one door (`create_method`).

Each method module defines a pydantic `...Params` model (its config section, discriminated by `name`) and a
`Method` subclass registered with `@register_method`. `trainer.config` collects the params models into the
experiment schema.
"""

from __future__ import annotations

from collections.abc import Callable

from trainer.methods.base import Method, TeacherInfo

_BUILDERS: dict[str, Callable[..., Method]] = {}


def register_method(name: str):
    """Register `builder(params, *, num_classes, in_chans, teachers) -> Method` under `name`."""

    def decorate(builder: Callable[..., Method]) -> Callable[..., Method]:
        if name in _BUILDERS:
            raise ValueError(f"method {name!r} registered twice")
        _BUILDERS[name] = builder
        return builder

    return decorate


def list_methods() -> list[str]:
    return sorted(_BUILDERS)


def create_method(params, *, num_classes: int, in_chans: int, teachers: list[TeacherInfo]) -> Method:
    """Build the method named by `params.name` from its validated params."""
    if params.name not in _BUILDERS:
        raise ValueError(f"unknown method {params.name!r}; available: {', '.join(list_methods())}")
    return _BUILDERS[params.name](params, num_classes=num_classes, in_chans=in_chans, teachers=teachers)


# Importing the method modules registers them; they import `register_method` from this package, so the
# imports stay below its definition.
from trainer.methods import ce, ekd, feed, kd, okd, one, student_ensemble  # noqa: E402,F401
