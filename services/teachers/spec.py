"""What a teacher is: its preprocessing, its spec (architecture, classes, weights, taps) and the identity
that keys its cached outputs, and a built teacher."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

# timm's and torchvision's evaluation convention (resize 256, centre crop 224, bilinear): the values every
# teacher had before `Preprocessing` carried them, and the ones that its identity leaves out.
DEFAULT_CROP_PCT = 0.875
DEFAULT_INTERPOLATION = "bilinear"
INTERPOLATIONS = ("bilinear", "bicubic")
_IDENTITY_VERSION = "ekd.teacher-identity.v1"


@dataclass(frozen=True)
class Preprocessing:
    """How uint8 images become model input: scale to [0, 1], resize to `input_size` square, normalise.

    `interpolation` is how that resize samples. `crop_pct` is the share of the resized image an evaluation
    view keeps (resize to input_size / crop_pct, crop the centre), the convention a model's published accuracy
    was measured with; the data pipeline makes those views, the engine never crops.
    """

    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_chans: int = 3
    crop_pct: float = DEFAULT_CROP_PCT
    interpolation: str = DEFAULT_INTERPOLATION

    def __post_init__(self) -> None:
        # Stored as plain float tuples so that checkpoints' lists and JSON round trips compare and hash equal.
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        object.__setattr__(self, "crop_pct", float(self.crop_pct))
        if self.input_size < 1:
            raise ValueError(f"input_size must be a positive pixel count, got {self.input_size}")
        if self.in_chans < 1:
            raise ValueError(f"in_chans must be at least 1, got {self.in_chans}")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(
                f"mean and std need one value per channel (in_chans={self.in_chans}), "
                f"got mean={self.mean}, std={self.std}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be positive, got {self.std}")
        if self.crop_pct <= 0:
            raise ValueError(f"crop_pct must be positive, got {self.crop_pct}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}"
            )

    @classmethod
    def imagenet(cls, input_size: int = 224) -> Preprocessing:
        """ImageNet channel statistics (torchvision's and timm's defaults)."""
        return cls(input_size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

    @classmethod
    def cifar(cls, input_size: int = 32) -> Preprocessing:
        """CIFAR-10 training-set channel mean and (population) standard deviation."""
        return cls(input_size, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        return cls(
            input_size=int(data["input_size"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            in_chans=int(data.get("in_chans", 3)),
            crop_pct=float(data.get("crop_pct", DEFAULT_CROP_PCT)),
            interpolation=str(data.get("interpolation", DEFAULT_INTERPOLATION)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "in_chans": self.in_chans,
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
        }

    def identity_dict(self) -> dict[str, Any]:
        """`to_dict` less the fields added after identity v1 that hold their defaults.

        Every teacher made before those fields existed keeps its identity, and with it its cached outputs.
        """
        data = self.to_dict()
        for key, default in (("crop_pct", DEFAULT_CROP_PCT), ("interpolation", DEFAULT_INTERPOLATION)):
            if data[key] == default:
                del data[key]
        return data


@dataclass(frozen=True)
class TeacherSpec:
    """What a teacher is: architecture, classes, weights, preprocessing and the feature taps it exposes.

    `taps` maps a tap name to the dotted path of a submodule whose output is the tap. `weights_sha256` is the
    sha256 of the checkpoint file; None means randomly initialised weights.
    """

    name: str
    num_classes: int
    preprocessing: Preprocessing
    taps: dict[str, str] = field(hash=False)
    weights_sha256: str | None = None
    checkpoint: str | None = None

    @property
    def identity(self) -> str:
        """Stable hex digest of everything that determines the outputs (not where the checkpoint lies)."""
        payload = {
            "version": _IDENTITY_VERSION,
            "name": self.name,
            "num_classes": self.num_classes,
            "weights_sha256": self.weights_sha256,
            "preprocessing": self.preprocessing.identity_dict(),
            "taps": sorted(self.taps.items()),
        }
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "preprocessing": self.preprocessing.to_dict(),
            "taps": dict(self.taps),
            "weights_sha256": self.weights_sha256,
            "checkpoint": self.checkpoint,
            "identity": self.identity,
        }


@dataclass
class Teacher:
    """A built teacher: the model (eval mode, frozen) and its spec."""

    model: nn.Module
    spec: TeacherSpec
