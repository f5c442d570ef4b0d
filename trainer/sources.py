"""Where a method's teacher outputs come from: one interface, chosen by the experiment's
`teacher_source.kind`.

`InProcessTeacherSource` runs the teachers in the training process (the way torchdistill does): the baseline
that the served path is measured against.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from services.cache import open_store
from services.client import TeacherClient
from services.contract import LOGITS
from services.engine import TeacherEngine
from services.errors import ConfigError
from services.zoo import Teacher, create_teacher
from trainer.config import ExperimentConfig
from trainer.methods.base import TeacherInfo, TeacherOutputs


class TeacherSource(ABC):
    """Teacher outputs for batches of uint8 images, teachers in the experiment's order."""

    @abstractmethod
    def describe(self, image_size: int) -> list[TeacherInfo]:
        """What methods may know before training: classes and tap shapes for images of `image_size`."""

    # How many batches `submit` may have outstanding for the service to work on while earlier ones are read.
    batches_in_flight = 1

    @abstractmethod
    def fetch(self, images: torch.Tensor, wanted: Sequence[Sequence[str]]) -> TeacherOutputs:
        """Outputs for uint8 images [B, C, H, W]; `wanted[i]` names teacher i's outputs ([] skips it)."""

    def submit(self, images: torch.Tensor, wanted: Sequence[Sequence[str]]) -> Callable[[], TeacherOutputs]:
        """`fetch`, started: call the returned function for its outputs. Here it runs at once; a source that
        can overlap work (the served one) returns before its outputs are in."""
        outputs = self.fetch(images, wanted)
        return lambda: outputs

    @abstractmethod
    def parameter_counts(self) -> list[int]:
        """Parameters of each teacher, for the results table."""

    @abstractmethod
    def counters(self) -> dict[str, int]:
        """Running totals for the run summary (teacher calls; cache hits and misses where there is a
        cache)."""

    def close(self) -> None:  # noqa: B027 (optional: most sources hold nothing to release)
        """Release what the source holds (connections, devices)."""


class InProcessTeacherSource(TeacherSource):
    def __init__(self, teachers: Sequence[Teacher], device: str | torch.device = "cpu") -> None:
        self.engines = [TeacherEngine(t, device) for t in teachers]

    def describe(self, image_size: int) -> list[TeacherInfo]:
        return [
            TeacherInfo(
                name=e.spec.name, num_classes=e.spec.num_classes, feature_shapes=e.feature_shapes(image_size)
            )
            for e in self.engines
        ]

    def fetch(self, images: torch.Tensor, wanted: Sequence[Sequence[str]]) -> TeacherOutputs:
        logits, features = [], []
        for engine, outputs in zip(self.engines, wanted, strict=True):
            result = engine.infer(images, list(outputs)) if outputs else {}
            logits.append(result.get(LOGITS))
            features.append({k: v for k, v in result.items() if k != LOGITS})
        return TeacherOutputs(logits=logits, features=features)

    def parameter_counts(self) -> list[int]:
        return [sum(p.numel() for p in e.model.parameters()) for e in self.engines]

    def counters(self) -> dict[str, int]:
        return {"teacher_calls": sum(e.calls for e in self.engines)}


class ServedTeacherSource(TeacherSource):
    """Teacher outputs from the shared cache first and the teacher service for the misses (`TeacherClient`).

    `teachers[i]` is teacher i's name on the service. When `expected_identities[i]` is given (the identity of
    a local checkpoint of the same teacher), the service must host exactly that teacher: same architecture,
    weights and preprocessing; a mismatch is an error, not silently different targets. `max_in_flight` is how
    many Infer requests the client keeps outstanding, and how many batches `submit` lets run ahead.
    """

    def __init__(
        self,
        address: str,
        teachers: Sequence[str],
        *,
        cache_uri: str | None = None,
        expected_identities: Sequence[str | None] | None = None,
        timeout_seconds: float = 120.0,
        max_in_flight: int = 1,
    ) -> None:
        self.names = list(teachers)
        self.store = open_store(cache_uri) if cache_uri else None
        self.client = TeacherClient(
            address, store=self.store, timeout_seconds=timeout_seconds, max_in_flight=max_in_flight
        )
        self.batches_in_flight = max_in_flight
        hosted = self.client.teachers()
        for i, name in enumerate(self.names):
            if name not in hosted:
                raise ConfigError(
                    f"the teacher service at {address} hosts no teacher {name!r}; it hosts: "
                    f"{', '.join(sorted(hosted))}"
                )
            expected = (expected_identities or [None] * len(self.names))[i]
            if expected is not None and hosted[name].identity != expected:
                raise ConfigError(
                    f"the teacher service's {name!r} is not the local checkpoint's teacher (identity "
                    f"{hosted[name].identity[:12]}… ≠ {expected[:12]}…): other weights or "
                    "preprocessing; point the experiment at the checkpoint the service loaded"
                )
        self.descriptions = [hosted[n] for n in self.names]

    def describe(self, image_size: int) -> list[TeacherInfo]:
        # The service resizes every image to the teacher's input size: tap shapes do not depend on image_size.
        return [
            TeacherInfo(name=d.name, num_classes=d.num_classes, feature_shapes=dict(d.taps))
            for d in self.descriptions
        ]

    def fetch(self, images: torch.Tensor, wanted: Sequence[Sequence[str]]) -> TeacherOutputs:
        return self.submit(images, wanted)()

    def submit(self, images: torch.Tensor, wanted: Sequence[Sequence[str]]) -> Callable[[], TeacherOutputs]:
        asked = {name: list(outputs) for name, outputs in zip(self.names, wanted, strict=True) if outputs}
        if not asked:
            return lambda: self._outputs({}, wanted)
        pending = self.client.submit(images, list(asked), asked)
        return lambda: self._outputs(pending.result(), wanted)

    def _outputs(
        self, result: dict[str, dict[str, torch.Tensor]], wanted: Sequence[Sequence[str]]
    ) -> TeacherOutputs:
        logits, features = [], []
        for name, outputs in zip(self.names, wanted):
            got = result.get(name, {}) if outputs else {}
            logits.append(got.get(LOGITS))
            features.append({k: v for k, v in got.items() if k != LOGITS})
        return TeacherOutputs(logits=logits, features=features)

    def parameter_counts(self) -> list[int]:
        # The service does not say; the architecture does (built with random weights, never run).
        return [
            sum(p.numel() for p in create_teacher(d.architecture, d.num_classes).model.parameters())
            for d in self.descriptions
        ]

    def counters(self) -> dict[str, int]:
        stats = self.client.stats
        return {
            "teacher_calls": stats.requests,
            "cache_hits": stats.cache_hits,
            "cache_misses": stats.cache_misses,
            "remote_samples": stats.remote_samples,
        }

    def close(self) -> None:
        self.client.close()
        if self.store is not None:
            self.store.close()


def build_teacher_source(cfg: ExperimentConfig, num_classes: int, device: torch.device) -> TeacherSource:
    """The experiment's teacher source, as `teacher_source.kind` says.

    in_process loads every teacher's checkpoint here. served names each teacher by `served_as` (default: its
    zoo name) and, where the checkpoint is present locally, requires the service to host exactly that teacher.
    """
    settings = cfg.teacher_source
    if settings.kind == "in_process":
        return InProcessTeacherSource(
            [create_teacher(t.name, num_classes, checkpoint=t.checkpoint) for t in cfg.teachers], device
        )
    names = [t.served_as or t.name for t in cfg.teachers]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"teachers {names} share a name on the service, so they would give identical outputs; "
            "give each its own `served_as`"
        )
    expected = [
        create_teacher(t.name, num_classes, checkpoint=t.checkpoint).spec.identity
        if Path(t.checkpoint).is_file()
        else None
        for t in cfg.teachers
    ]
    return ServedTeacherSource(
        settings.address,
        names,
        cache_uri=settings.cache,
        expected_identities=expected,
        timeout_seconds=settings.timeout_seconds,
        max_in_flight=settings.max_in_flight,
    )
