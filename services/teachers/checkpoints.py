"""Teacher checkpoints: ekd's own `ekd.teacher.v1` files written and read back, and any weights file
`services.core.weights` reads, checked against the architecture asked for. Everything is read with
`weights_only=True` or from safetensors, so that no file can run code."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from services.core.errors import UserError
from services.core.weights import (
    NoStateDictError,
    PickledObjectError,
    WeightsFileError,
    WeightsFileNotFoundError,
    find_state_dict,
    read_weights_file,
)
from services.teachers.spec import Preprocessing

CHECKPOINT_FORMAT = "ekd.teacher.v1"
_HASH_CHUNK_BYTES = 1 << 20
_MISMATCHES_SHOWN = 5


class TeacherCheckpointError(UserError, ValueError):
    """A checkpoint file that cannot provide weights for the requested teacher."""

    def __init__(self, path: str | os.PathLike, architecture: str, problem: str) -> None:
        super().__init__(
            f"teacher checkpoint {str(path)!r} (expected architecture {architecture!r}): {problem}"
        )
        self.path = str(path)
        self.architecture = architecture


def write_teacher_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    name: str,
    num_classes: int,
    preprocessing: Preprocessing,
    training_data: Mapping[str, Any] | None = None,
) -> str:
    """Write an `ekd.teacher.v1` checkpoint (tensors and plain data only) and return its sha256.

    `training_data` (plain data) records what the teacher was trained on, for whoever reuses the checkpoint.
    The file is written to a temporary name and renamed, so a reader never sees half a checkpoint.
    """
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "architecture": name,
        "num_classes": int(num_classes),
        "preprocessing": preprocessing.to_dict(),
        "state_dict": {key: value.detach().to("cpu") for key, value in model.state_dict().items()},
    }
    if training_data is not None:
        payload["training_data"] = dict(training_data)
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp_name)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return file_sha256(path)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class LoadedCheckpoint:
    state_dict: dict[str, torch.Tensor]
    preprocessing: Preprocessing | None
    sha256: str


def load_checkpoint(path: Path, name: str, num_classes: int) -> LoadedCheckpoint:
    """Read a teacher's weights file and check it against the request.

    Formats: an `ekd.teacher.v1` checkpoint, or any weights file `services.core.weights` reads.
    """
    try:
        content = read_weights_file(path)
        if not isinstance(content, dict):
            raise TeacherCheckpointError(
                path, name, f"holds a {type(content).__name__}, not a checkpoint dict"
            )
        ekd_checkpoint = "format" in content
        preprocessing = (
            _checked_teacher_checkpoint(content, path, name, num_classes) if ekd_checkpoint else None
        )
        state_dict = find_state_dict(content["state_dict"] if ekd_checkpoint else content, path)
    except WeightsFileError as err:
        raise TeacherCheckpointError(path, name, _teacher_checkpoint_problem(err)) from err
    return LoadedCheckpoint(state_dict, preprocessing, file_sha256(path))


def _checked_teacher_checkpoint(
    content: dict[str, Any], path: Path, name: str, num_classes: int
) -> Preprocessing | None:
    """Check an `ekd.teacher.v1` checkpoint's metadata against the request; return its preprocessing."""
    if content["format"] != CHECKPOINT_FORMAT:
        raise TeacherCheckpointError(
            path, name, f"unsupported format {content['format']!r}; expected {CHECKPOINT_FORMAT!r}"
        )
    if content.get("architecture") != name:
        raise TeacherCheckpointError(
            path,
            name,
            f"architecture mismatch: checkpoint says {content.get('architecture')!r}, asked for {name!r}",
        )
    if content.get("num_classes") != num_classes:
        raise TeacherCheckpointError(
            path,
            name,
            f"num_classes mismatch: checkpoint has {content.get('num_classes')!r}, asked for {num_classes}",
        )
    stored = content.get("preprocessing")
    try:
        preprocessing = Preprocessing.from_dict(stored) if stored is not None else None
    except (KeyError, TypeError, ValueError) as err:
        raise TeacherCheckpointError(path, name, f"invalid preprocessing {stored!r}: {err}") from err
    if "state_dict" not in content:
        raise TeacherCheckpointError(path, name, "no 'state_dict' entry")
    return preprocessing


def _teacher_checkpoint_problem(err: WeightsFileError) -> str:
    """The reader's problem in the zoo's words, which teacher checkpoints have always been refused in."""
    if isinstance(err, WeightsFileNotFoundError):
        return "file not found"
    if isinstance(err, PickledObjectError):
        return (
            f"holds a pickled {err.global_name}; ekd reads only tensors and plain data from torch files "
            "(weights_only=True): save the state_dict alone, or as safetensors"
        )
    if isinstance(err, NoStateDictError):
        return f"neither an {CHECKPOINT_FORMAT} checkpoint nor a state_dict of named tensors"
    return err.problem


def load_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], path: Path, name: str, num_classes: int
) -> None:
    expected = model.state_dict()
    # BatchNorm's batch counters are absent from weights saved before PyTorch 0.4.1 (torchvision's first
    # ResNets, Cadene's SENet154); evaluation never reads them and load_state_dict zero-fills them.
    missing = [k for k in expected if k not in state_dict and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {list(state_dict[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = [
        f"{key} has {state_dict[key].shape[0]} classes, asked for {num_classes}"
        for key in _classifier_weights(model, num_classes)
        if key in state_dict and state_dict[key].ndim == 2 and state_dict[key].shape[0] != num_classes
    ]
    findings = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", mismatched))
    for label, keys in findings:
        if keys:
            more = f" (+{len(keys) - _MISMATCHES_SHOWN} more)" if len(keys) > _MISMATCHES_SHOWN else ""
            problems.append(f"{label} {', '.join(keys[:_MISMATCHES_SHOWN])}{more}")
    if problems:
        raise TeacherCheckpointError(path, name, "state_dict does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state_dict)


def _classifier_weights(model: nn.Module, num_classes: int) -> list[str]:
    return [
        f"{module_path}.weight"
        for module_path, module in model.named_modules()
        if isinstance(module, nn.Linear) and module.out_features == num_classes
    ]
