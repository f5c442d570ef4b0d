"""Teacher model zoo: one registry, one door.

Follows timm's registry/factory pattern: each architecture is a short entrypoint registered with a decorator
that records its default preprocessing and feature taps, and `create_teacher` is the only way to build one.
A built teacher carries a `TeacherSpec` (weights + preprocessing + taps) whose `identity` keys the output
cache.

Besides the registered entries, `timm:<architecture>` names any timm model, with the preprocessing of timm's
pretrained config for it and its last feature stages as taps.

Weights are never downloaded: entries use the real torchvision / timm / CIFAR constructors with random
initialisation, and trained weights come from a local file: ekd's own checkpoint, a safetensors file, or a
torch state dict (bare or nested the way training scripts save it), read with `weights_only=True`, so that
no file can run code. The key layouts timm and torchvision publish weights in load as they are: torchvision's
and timm's `resnet152` share the torchvision entry's key names, `senet154` is timm's, and `legacy_senet154`
is timm's copy of Cadene's SENet154, the layout SENet154's ImageNet weights are usually published in.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
from torch import nn

from services.core.errors import ConfigError, UnknownNameError
from services.core.registry import Registry
from services.teachers.checkpoints import load_checkpoint, load_state_dict, write_teacher_checkpoint
from services.teachers.spec import Preprocessing, Teacher, TeacherSpec

logger = logging.getLogger(__name__)

TIMM_PREFIX = "timm:"
_TIMM_TAPPED_STAGES = 2


TeacherBuilder = Callable[[int, int], nn.Module]
# A built model's feature taps: {tap name: dotted path of the submodule whose output is the tap}.
TapFinder = Callable[[nn.Module], Mapping[str, str]]


@dataclass(frozen=True)
class _ZooEntry:
    build: TeacherBuilder
    preprocessing: Preprocessing
    taps: TapFinder


TEACHERS: Registry[_ZooEntry] = Registry("teacher")


def register_teacher(
    *, preprocessing: Preprocessing, taps: Mapping[str, str]
) -> Callable[[TeacherBuilder], TeacherBuilder]:
    """Register `fn(num_classes, in_chans) -> nn.Module` under its function name with its defaults."""

    fixed_taps = dict(taps)

    def register(fn: TeacherBuilder) -> TeacherBuilder:
        TEACHERS.add(fn.__name__, _ZooEntry(fn, preprocessing, lambda model: fixed_taps))
        return fn

    return register


def check_teacher_name(name: str) -> str:
    """Return `name` if it names a teacher (a registered entry or `timm:<architecture>`).

    Otherwise raise `UnknownNameError` saying what exists; config validators call this.
    """
    _zoo_entry(name)
    return name


def default_preprocessing(name: str) -> Preprocessing:
    """The preprocessing teacher `name` has without a checkpoint saying otherwise (a registered entry's, or
    timm's pretrained config's), read without building the model."""
    return _zoo_entry(name).preprocessing


def _zoo_entry(name: str) -> _ZooEntry:
    if name.startswith(TIMM_PREFIX):
        return _timm_entry(name)
    try:
        return TEACHERS.get(name)
    except UnknownNameError as err:
        raise UnknownNameError(f"{err}; or {TIMM_PREFIX}<architecture> for any timm model") from None


def _timm_entry(name: str) -> _ZooEntry:
    """`timm:<architecture>`: timm's constructor, its pretrained config's preprocessing, its last stages."""
    architecture = name.removeprefix(TIMM_PREFIX)
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=5)
        hint = f"; close matches: {', '.join(TIMM_PREFIX + match for match in close)}" if close else ""
        raise UnknownNameError(f"unknown teacher {name!r}: timm has no architecture {architecture!r}{hint}")
    try:
        pretrained_cfg = timm.models.get_pretrained_cfg(architecture)
    except RuntimeError as err:  # a `.tag` suffix that timm does not know
        raise UnknownNameError(f"unknown teacher {name!r}: {err}") from None

    def build(num_classes: int, in_chans: int) -> nn.Module:
        return timm.create_model(architecture, pretrained=False, num_classes=num_classes, in_chans=in_chans)

    if pretrained_cfg is None:
        logger.warning("teacher %r: timm has no pretrained config for it; using ImageNet preprocessing", name)
        return _ZooEntry(build, Preprocessing.imagenet(), _last_feature_stages)
    in_chans, height, width = pretrained_cfg.input_size
    if height != width:
        raise ConfigError(
            f"teacher {name!r}: timm's config expects {height}x{width} inputs; ekd's teachers take "
            "square images"
        )
    preprocessing = Preprocessing(
        input_size=width,
        mean=pretrained_cfg.mean,
        std=pretrained_cfg.std,
        in_chans=in_chans,
        crop_pct=pretrained_cfg.crop_pct,
        interpolation=pretrained_cfg.interpolation,
    )
    return _ZooEntry(build, preprocessing, _last_feature_stages)


def _last_feature_stages(model: nn.Module) -> dict[str, str]:
    """The deepest stages in timm's `feature_info`, named by their module path; none if it lists none."""
    stages = getattr(model, "feature_info", None) or []
    return {stage["module"]: stage["module"] for stage in stages[-_TIMM_TAPPED_STAGES:]}


def create_teacher(
    name: str,
    num_classes: int,
    checkpoint: str | os.PathLike | None = None,
    preprocessing: Preprocessing | None = None,
) -> Teacher:
    """Build a registered teacher, optionally loading a local checkpoint, frozen and in eval mode.

    Preprocessing precedence: the explicit `preprocessing` argument, then the checkpoint's, then the entry's.
    """
    entry = _zoo_entry(name)
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    checkpoint_path = Path(checkpoint) if checkpoint is not None else None
    loaded = load_checkpoint(checkpoint_path, name, num_classes) if checkpoint_path is not None else None
    resolved = entry.preprocessing
    if loaded is not None and loaded.preprocessing is not None:
        resolved = loaded.preprocessing
    if preprocessing is not None:
        resolved = preprocessing
    model = entry.build(num_classes, resolved.in_chans)
    taps = dict(entry.taps(model))
    for module_path in taps.values():
        model.get_submodule(module_path)  # a registration error surfaces here, not at the first request
    if loaded is not None and checkpoint_path is not None:
        load_state_dict(model, loaded.state_dict, checkpoint_path, name, num_classes)
    model.eval().requires_grad_(False)
    spec = TeacherSpec(
        name=name,
        num_classes=num_classes,
        preprocessing=resolved,
        taps=taps,
        weights_sha256=loaded.sha256 if loaded is not None else None,
        checkpoint=str(checkpoint) if checkpoint is not None else None,
    )
    return Teacher(model=model, spec=spec)


def save_teacher_checkpoint(
    path: str | os.PathLike,
    teacher_or_model: Teacher | nn.Module,
    name: str,
    num_classes: int,
    preprocessing: Preprocessing | None = None,
    training_data: Mapping[str, Any] | None = None,
) -> str:
    """Write an `ekd.teacher.v1` checkpoint of teacher `name` (`write_teacher_checkpoint`); return its sha256.

    `preprocessing` defaults to the entry's; store the one the model was trained with.
    """
    model = teacher_or_model.model if isinstance(teacher_or_model, Teacher) else teacher_or_model
    resolved = preprocessing or _zoo_entry(name).preprocessing
    return write_teacher_checkpoint(path, model, name, num_classes, resolved, training_data)
