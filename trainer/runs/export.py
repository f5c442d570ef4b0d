"""Exported students: written after training, loaded back to predict (`torch.load(..., weights_only=True)`).

An export holds the student's tensors and, as plain data, what rebuilds its network without the run that made
it: the method's config (minus the files that gave initial weights, which the saved tensors replace), the
teachers' descriptions its method was sized for, the class count and channels, and the student's
normalization and image size, so that `LoadedStudent.predict` takes the same uint8 images training saw.

Every export a run wrote (an ensemble's combined prediction too) is checked by `check_exports` (`ekd evaluate
RUN_DIR`): each is loaded back with `weights_only=True` and evaluated on the run's test split, which must give
exactly the accuracy the run recorded.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from services.core.errors import UserError
from services.core.weights import WeightsFileError, read_weights_file
from trainer.config import ExperimentConfig
from trainer.data import normalize
from trainer.methods import METHODS, MethodParams, create_method
from trainer.methods.base import TeacherInfo
from trainer.runs.inputs import load_splits
from trainer.runs.loop import EVAL_BATCH_SIZE, eval_loader, readable_batches

STUDENT_FORMAT = "ekd.student.v2"
# Student options that only name a file of initial weights; the exported tensors replace those weights.
INITIAL_WEIGHT_OPTIONS = ("source_checkpoint",)


class ExportError(UserError):
    """A file that is not an exported student ekd can load; the message names it."""


@dataclass(frozen=True)
class ExportedNetwork:
    """What an export records beside the tensors."""

    method: dict[str, Any]  # the method's params, as JSON data
    name: str  # the student's name among the method's exported students
    num_classes: int
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    teachers: list[TeacherInfo]


def save_student(path: str | os.PathLike, student: nn.Module, network: ExportedNetwork) -> None:
    payload = {
        "format": STUDENT_FORMAT,
        **asdict(network),
        "teachers": [asdict(teacher) for teacher in network.teachers],
        "state_dict": {key: value.detach().cpu() for key, value in student.state_dict().items()},
    }
    torch.save(payload, path)


@dataclass
class LoadedStudent:
    network: nn.Module
    exported: ExportedNetwork

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Scores [B, classes] for uint8 images [B, C, image_size, image_size]."""
        device = next(self.network.parameters()).device
        return self.network(normalize(images.to(device), self.exported.mean, self.exported.std))


def load_student(path: str | os.PathLike, device: torch.device | str = "cpu") -> LoadedStudent:
    """Rebuild an exported student's network and load its tensors (weights_only: no code runs)."""
    path = Path(path)
    try:
        payload = read_weights_file(path)  # weights_only: a pickled object is refused, never built
    except WeightsFileError as error:
        raise ExportError(f"cannot read exported student {path}: {error.problem}") from error
    if not isinstance(payload, dict) or payload.get("format") != STUDENT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ExportError(f"{path} is not an exported student of format {STUDENT_FORMAT!r} (found {found!r})")
    exported = ExportedNetwork(
        method=payload["method"],
        name=payload["name"],
        num_classes=payload["num_classes"],
        in_chans=payload["in_chans"],
        image_size=payload["image_size"],
        mean=tuple(payload["mean"]),
        std=tuple(payload["std"]),
        teachers=[
            TeacherInfo(t["name"], t["num_classes"], {k: tuple(v) for k, v in t["feature_shapes"].items()})
            for t in payload["teachers"]
        ],
    )
    # A registered params class is a method's params (register_method checks its `name` field); the registry
    # holds it as a plain pydantic model class.
    params = cast(
        MethodParams,
        METHODS.get(exported.method["name"]).params.model_validate(_without_initial_weights(exported.method)),
    )
    method = create_method(
        params, num_classes=exported.num_classes, in_chans=exported.in_chans, teachers=exported.teachers
    )
    network = method.exported_students()[exported.name]
    network.load_state_dict(payload["state_dict"])
    return LoadedStudent(network.to(device).eval(), exported)


@dataclass(frozen=True)
class ExportCheck:
    """One export of a run, loaded back and evaluated on the run's test split."""

    seed: int
    name: str
    path: str
    recorded: float  # the test accuracy the run recorded for it
    measured: float  # the test accuracy of the loaded export
    headline: bool  # the method's prediction: its accuracy is the run's test_accuracy too

    @property
    def reproduced(self) -> bool:
        return self.measured == self.recorded


def accuracy_on(student: LoadedStudent, dataset) -> float:
    """Top-1 accuracy of a loaded student on a dataset of (uint8 image, label), in its order."""
    correct = total = 0
    for (images, labels, *_), _skipped in readable_batches(eval_loader(dataset, EVAL_BATCH_SIZE)):
        correct += (student.predict(images).argmax(1).cpu() == labels).sum().item()
        total += labels.shape[0]
    return correct / max(total, 1)


def check_exports(run_dir: str | os.PathLike) -> list[ExportCheck]:
    """Load every export of every seed recorded in `run_dir` (`results_seed<N>.json`, `students/seed<N>/`)
    and measure its test accuracy on the split its run used."""
    run_dir = Path(run_dir)
    records = sorted(run_dir.glob("results_seed*.json"))
    if not records:
        raise ExportError(f"{run_dir} holds no results_seed<N>.json: not a run directory of `ekd distill`")
    checks = []
    for record_path in records:
        record = json.loads(record_path.read_text())
        if not record.get("config"):
            raise ExportError(
                f"{record_path} records no config (written by an older ekd): rerun the experiment"
            )
        splits = load_splits(ExperimentConfig.model_validate(record["config"]))
        for student in record["students"]:
            path = run_dir / "students" / f"seed{record['seed']}" / f"{student['name']}.pt"
            headline = student["name"] == record["headline"]
            recorded = record["test_accuracy"] if headline else student["test_accuracy"]
            measured = accuracy_on(load_student(path), splits.test)
            checks.append(
                ExportCheck(record["seed"], student["name"], str(path), recorded, measured, headline)
            )
    return checks


def _without_initial_weights(data: Any) -> Any:
    """The method's config with every student's initial-weight files dropped (they need not exist here)."""
    if isinstance(data, list):
        return [_without_initial_weights(item) for item in data]
    if not isinstance(data, dict):
        return data
    cleaned = {key: _without_initial_weights(value) for key, value in data.items()}
    if "arch" in cleaned and "options" in cleaned:  # a StudentConfig
        cleaned["init_checkpoint"] = None
        cleaned["options"] = {k: v for k, v in cleaned["options"].items() if k not in INITIAL_WEIGHT_OPTIONS}
    return cleaned
