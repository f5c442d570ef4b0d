"""Every timm architecture as a student, named `timm:<name>` (`timm:resnet50`, `timm:mobilenetv3_large_100`).

Built by `timm.create_model` with random weights: ekd never downloads weights, so a student's initial weights
come only from a local file (`StudentConfig.init_checkpoint`).
"""

from __future__ import annotations

import difflib

import timm
from torch import nn

from services.core.errors import ConfigError, UnknownNameError

TIMM_PREFIX = "timm:"

# timm options that would download weights, or read a local file with timm's own (unrestricted) loader.
_WEIGHT_LOADING_OPTIONS = frozenset({"pretrained", "checkpoint_path"})

_LIST_HINT = "list them with `python -c \"import timm; print('\\n'.join(timm.list_models()))\"`"


def check_timm_arch(arch: str) -> str:
    """The timm model name in `timm:<name>`; an unknown name is an error listing close matches."""
    name = arch.removeprefix(TIMM_PREFIX)
    if timm.is_model(name):
        return name
    close = difflib.get_close_matches(name, timm.list_models(), n=5)
    hint = f"close matches: {', '.join(TIMM_PREFIX + c for c in close)}" if close else _LIST_HINT
    raise UnknownNameError(f"unknown timm architecture {name!r} (student arch {arch!r}); {hint}")


def create_timm_student(arch: str, num_classes: int, in_chans: int = 3, **options) -> nn.Module:
    """timm's `arch` (`timm:<name>`) for `num_classes` and `in_chans`, other options passed to timm."""
    name = check_timm_arch(arch)
    refused = sorted(_WEIGHT_LOADING_OPTIONS & options.keys())
    if refused:
        raise ConfigError(
            f"student {arch!r}: option {', '.join(refused)} is not supported; ekd downloads no weights and "
            "reads initial weights only from `init_checkpoint` (safetensors or weights_only torch files)"
        )
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **options)
