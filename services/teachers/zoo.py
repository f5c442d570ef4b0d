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
import hashlib
import json
import logging
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from torch import nn

from services.core.errors import ConfigError, UnknownNameError, UserError
from services.core.registry import Registry
from services.core.weights import (
    NoStateDictError,
    PickledObjectError,
    WeightsFileError,
    WeightsFileNotFoundError,
    find_state_dict,
    read_weights_file,
)
from services.teachers.cifar_models import CifarResNet, CifarWideResNet

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "ekd.teacher.v1"
TIMM_PREFIX = "timm:"
# timm's and torchvision's evaluation convention (resize 256, centre crop 224, bilinear): the values every
# teacher had before `Preprocessing` carried them, and the ones that its identity leaves out.
DEFAULT_CROP_PCT = 0.875
DEFAULT_INTERPOLATION = "bilinear"
INTERPOLATIONS = ("bilinear", "bicubic")
_IDENTITY_VERSION = "ekd.teacher-identity.v1"
_HASH_CHUNK_BYTES = 1 << 20
_MISMATCHES_SHOWN = 5
_TIMM_TAPPED_STAGES = 2


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


class TeacherCheckpointError(UserError, ValueError):
    """A checkpoint file that cannot provide weights for the requested teacher."""

    def __init__(self, path: str | os.PathLike, architecture: str, problem: str) -> None:
        super().__init__(
            f"teacher checkpoint {str(path)!r} (expected architecture {architecture!r}): {problem}"
        )
        self.path = str(path)
        self.architecture = architecture


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
    loaded = _load_checkpoint(Path(checkpoint), name, num_classes) if checkpoint is not None else None
    resolved = entry.preprocessing
    if loaded is not None and loaded.preprocessing is not None:
        resolved = loaded.preprocessing
    if preprocessing is not None:
        resolved = preprocessing
    model = entry.build(num_classes, resolved.in_chans)
    taps = dict(entry.taps(model))
    for module_path in taps.values():
        model.get_submodule(module_path)  # a registration error surfaces here, not at the first request
    if loaded is not None:
        _load_state_dict(model, loaded.state_dict, Path(checkpoint), name, num_classes)
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
    """Write an `ekd.teacher.v1` checkpoint (tensors and plain data only) and return its sha256.

    `preprocessing` defaults to the entry's; store the one the model was trained with. `training_data`
    (plain data) records what the teacher was trained on, for whoever reuses the checkpoint. The file is
    written to a temporary name and renamed, so a reader never sees half a checkpoint.
    """
    entry = _zoo_entry(name)
    model = teacher_or_model.model if isinstance(teacher_or_model, Teacher) else teacher_or_model
    payload = {
        "format": CHECKPOINT_FORMAT,
        "architecture": name,
        "num_classes": int(num_classes),
        "preprocessing": (preprocessing or entry.preprocessing).to_dict(),
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
class _LoadedCheckpoint:
    state_dict: dict[str, torch.Tensor]
    preprocessing: Preprocessing | None
    sha256: str


def _load_checkpoint(path: Path, name: str, num_classes: int) -> _LoadedCheckpoint:
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
    return _LoadedCheckpoint(state_dict, preprocessing, file_sha256(path))


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


def _load_state_dict(
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


# ---- entries -------------------------------------------------------------------------------------------

IMAGENET_RESNET_TAPS = {f"layer{i}": f"layer{i}" for i in (1, 2, 3, 4)}
SENET_TAPS = {"layer3": "layer3", "layer4": "layer4"}
CIFAR_TAPS = {f"layer{i}": f"layer{i}" for i in (1, 2, 3)}
# The last stage's tap after the network's final BN-ReLU (CifarWideResNet.final_act), FT's and FEED's map.
CIFAR_WIDE_RESNET_TAPS = {"layer1": "layer1", "layer2": "layer2", "layer3": "final_act"}


def _torchvision_resnet(builder: Callable[..., nn.Module], num_classes: int, in_chans: int) -> nn.Module:
    model = builder(weights=None, num_classes=num_classes)
    if in_chans != 3:  # torchvision hard-codes RGB; swap the stem conv for one of the same geometry
        model.conv1 = nn.Conv2d(in_chans, model.conv1.out_channels, 7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


@register_teacher(preprocessing=Preprocessing.imagenet(), taps=IMAGENET_RESNET_TAPS)
def resnet18(num_classes: int, in_chans: int) -> nn.Module:
    return _torchvision_resnet(torchvision.models.resnet18, num_classes, in_chans)


@register_teacher(preprocessing=Preprocessing.imagenet(), taps=IMAGENET_RESNET_TAPS)
def resnet34(num_classes: int, in_chans: int) -> nn.Module:
    return _torchvision_resnet(torchvision.models.resnet34, num_classes, in_chans)


@register_teacher(preprocessing=Preprocessing.imagenet(), taps=IMAGENET_RESNET_TAPS)
def resnet50(num_classes: int, in_chans: int) -> nn.Module:
    return _torchvision_resnet(torchvision.models.resnet50, num_classes, in_chans)


@register_teacher(preprocessing=Preprocessing.imagenet(), taps=IMAGENET_RESNET_TAPS)
def resnet152(num_classes: int, in_chans: int) -> nn.Module:
    return _torchvision_resnet(torchvision.models.resnet152, num_classes, in_chans)


@register_teacher(preprocessing=Preprocessing.imagenet(), taps=SENET_TAPS)
def senet154(num_classes: int, in_chans: int) -> nn.Module:
    return timm.create_model("senet154", pretrained=False, num_classes=num_classes, in_chans=in_chans)


# timm's legacy_senet154 is Cadene's pretrainedmodels SENet154 (`layer0`, `last_linear`), the layout that
# SENet154's ImageNet weights are usually published in; its preprocessing is timm's config for it.
@register_teacher(preprocessing=Preprocessing.imagenet(), taps=SENET_TAPS)
def legacy_senet154(num_classes: int, in_chans: int) -> nn.Module:
    return timm.create_model("legacy_senet154", pretrained=False, num_classes=num_classes, in_chans=in_chans)


@register_teacher(preprocessing=Preprocessing.cifar(), taps=CIFAR_TAPS)
def cifar_resnet20(num_classes: int, in_chans: int) -> nn.Module:
    return CifarResNet(20, num_classes, in_chans=in_chans)


@register_teacher(preprocessing=Preprocessing.cifar(), taps=CIFAR_TAPS)
def cifar_resnet32(num_classes: int, in_chans: int) -> nn.Module:
    return CifarResNet(32, num_classes, in_chans=in_chans)


@register_teacher(preprocessing=Preprocessing.cifar(), taps=CIFAR_TAPS)
def cifar_resnet56(num_classes: int, in_chans: int) -> nn.Module:
    return CifarResNet(56, num_classes, in_chans=in_chans)


@register_teacher(preprocessing=Preprocessing.cifar(), taps=CIFAR_TAPS)
def cifar_resnet110(num_classes: int, in_chans: int) -> nn.Module:
    return CifarResNet(110, num_classes, in_chans=in_chans)


@register_teacher(preprocessing=Preprocessing.cifar(), taps=CIFAR_WIDE_RESNET_TAPS)
def cifar_wrn16_2(num_classes: int, in_chans: int) -> nn.Module:
    return CifarWideResNet(16, 2, num_classes, in_chans=in_chans)


@register_teacher(preprocessing=Preprocessing.cifar(), taps=CIFAR_WIDE_RESNET_TAPS)
def cifar_wrn16_4(num_classes: int, in_chans: int) -> nn.Module:
    return CifarWideResNet(16, 4, num_classes, in_chans=in_chans)


@register_teacher(preprocessing=Preprocessing.cifar(), taps=CIFAR_WIDE_RESNET_TAPS)
def cifar_wrn28_10(num_classes: int, in_chans: int) -> nn.Module:
    return CifarWideResNet(28, 10, num_classes, in_chans=in_chans)


# Near-zero compute (a mean over each channel and a 3 x num_classes linear layer), so that a benchmark of the
# served path at ImageNet size measures the transport, not the model: benchmarks/serving.py --transport.
@register_teacher(preprocessing=Preprocessing.imagenet(), taps={"pool": "pool"})
def benchmark_pool_linear(num_classes: int, in_chans: int) -> nn.Module:
    return nn.Sequential(
        OrderedDict(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(in_chans, num_classes))
    )
