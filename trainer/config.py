"""The experiment schema: one YAML file validated by pydantic, split by concern.

A wrong field gets an error naming the field, the value and what is allowed (`load_experiment` turns
pydantic's errors into one short `ConfigError` message for the CLI). YAML is data only: it never imports code.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.core.redaction import redact
from services.core.yaml_config import expand_environment, load_yaml_model
from services.teachers.zoo import check_teacher_name
from trainer.data import DatasetName
from trainer.methods import METHODS, MethodParams
from trainer.students import StudentConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    dataset: DatasetName = Field(
        "digits",
        description="dataset; digits is scikit-learn's, the others read a local root. imagefolder "
        "(<root>/train, <root>/test) and imagenet (<root>/train, <root>/val) are decoded on access in "
        "DataLoader workers and trained on replayed RandomResizedCrop views; the others are held in memory "
        "and trained on replayed pad-and-crop views",
    )
    root: str | None = Field(
        None, description="local dataset root for cifar10/cifar100/imagefolder/imagenet (never downloaded)"
    )
    image_size: int = Field(16, ge=8, le=512, description="side of the square uint8 images every model sees")
    val_fraction: float = Field(
        0.15,
        ge=0,
        lt=0.5,
        description="share of the training data held out for validation; 0: none (the papers' setting), "
        "the whole training split trains and no validation accuracy is reported",
    )
    train_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="share of the training split trained on (the limited-data regime): that share of each "
        "class, drawn by subset_seed (else split_seed), so every experiment and teacher with this seed sees "
        "the same subset (a smaller fraction's within a larger one's); validation and test splits do not "
        "change",
    )
    subset_seed: int | None = Field(
        None,
        ge=0,
        lt=2**32,
        description="seed of the limited-data subset (train_fraction < 1); None: split_seed. Apart from the "
        "split, so that another subset can be drawn (and swept) while the teachers' data and the held-out "
        "splits stay put",
    )
    test_fraction: float = Field(0.2, gt=0, lt=0.5, description="share held out for test (digits only)")
    split_seed: int = Field(
        0,
        ge=0,
        description="seed of the train/val/test split; fixed so that teachers and "
        "students of every experiment see the same held-out data",
    )
    replay_seed: int = Field(
        0,
        ge=0,
        description="seed of the augmentation replay; experiments sharing it (and "
        "views, pad, hflip) feed teachers identical inputs, so cached outputs are reused",
    )
    views: int = Field(
        4,
        ge=0,
        le=1024,
        description="augmented views replayed per sample (0: no augmentation); "
        "view of sample i at epoch e is a pure function of (seed, i, e mod views)",
    )
    pad: int = Field(
        2, ge=0, le=64, description="in-memory datasets: zero padding of the replayed random crop, in pixels"
    )
    hflip: bool = Field(False, description="horizontal flips in the replayed views (off for digits)")
    scale: tuple[float, float] = Field(
        (0.08, 1.0),
        description="imagefolder/imagenet: RandomResizedCrop's range of the crop's share of the area",
    )
    ratio: tuple[float, float] = Field(
        (3 / 4, 4 / 3), description="imagefolder/imagenet: RandomResizedCrop's range of aspect ratios"
    )
    crop_pct: float = Field(
        0.875,
        gt=0,
        le=1,
        description="imagefolder/imagenet evaluation: resize to image_size / crop_pct, "
        "then crop the centre (timm's and torchvision's convention; 0.875 is 256 -> 224)",
    )
    interpolation: Literal["bilinear", "bicubic"] = Field(
        "bilinear", description="imagefolder/imagenet: how views and evaluation images are resized"
    )
    mean: tuple[float, float, float] | None = Field(
        None,
        description="the student's per-channel input mean in [0, 1] pixel units; None: computed on the "
        "train split of in-memory datasets, else the first teacher's preprocessing's (else ImageNet's)",
    )
    std: tuple[float, float, float] | None = Field(
        None, description="the student's per-channel input std; None: as for mean"
    )
    workers: int = Field(
        0,
        ge=0,
        le=128,
        description="DataLoader worker processes that decode and crop (0: the training process)",
    )
    prefetch_factor: int = Field(2, ge=1, le=64, description="batches each DataLoader worker prepares ahead")
    pin_memory: bool | None = Field(
        None,
        description="page-locked batches for asynchronous copies to the GPU; None: when training on CUDA",
    )
    skip_unreadable: bool = Field(
        False,
        description="imagefolder/imagenet: skip (and count) image files that cannot be decoded instead "
        "of stopping with an error naming the file",
    )
    batch_size: int = Field(64, ge=1, le=4096)
    fake_samples: int = Field(512, ge=16, description="images in the fake dataset")

    @field_validator("scale", "ratio")
    @classmethod
    def _increasing_positive_range(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        if not 0 < bounds[0] <= bounds[1]:
            raise ValueError(f"needs 0 < low <= high, got {bounds}")
        return bounds

    @model_validator(mode="after")
    def _mean_and_std_together(self) -> DataConfig:
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std values must be positive, got {self.std}")
        return self


class OptimConfig(_Section):
    epochs: int = Field(20, ge=1, le=10_000, description="passes over the training split (see `steps`)")
    steps: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description="optimizer steps to train for instead of `epochs`: epochs = ceil(steps / optimizer "
        "steps per epoch), so runs on training splits of different sizes (data.train_fraction) get the "
        "same number of updates, within one epoch's",
    )
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0, lt=1)
    schedule: Literal["cosine", "multistep", "constant"] = Field(
        "cosine", description="learning-rate schedule, stepped per batch"
    )
    milestones: list[float] = Field(
        default_factory=lambda: [0.5, 0.75],
        description="multistep: fractions of training where lr is multiplied by gamma",
    )
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: float = Field(
        0.0,
        ge=0,
        description="epochs of linear learning-rate warm-up before the schedule (may be fractional)",
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the hard-label CE terms")
    accumulate_steps: int = Field(
        1, ge=1, le=1024, description="batches whose gradients add up before each optimizer step"
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on a CUDA device that supports it, fp32 elsewhere"
    )
    channels_last: bool | None = Field(
        None, description="channels_last memory format for the student; None: on CUDA"
    )
    compile: bool = Field(False, description="torch.compile what computes each step's loss")

    @field_validator("milestones")
    @classmethod
    def _fractions(cls, milestones: list[float]) -> list[float]:
        if any(not 0 < m < 1 for m in milestones) or milestones != sorted(milestones):
            raise ValueError(f"milestones must be increasing fractions in (0, 1), got {milestones}")
        return milestones


class TeacherConfig(_Section):
    name: str = Field(
        description="teacher architecture: a zoo entry (services.teachers.zoo.TEACHERS) or "
        "timm:<any timm model>"
    )
    checkpoint: str = Field(
        description="local checkpoint path; trained first when missing (nothing is downloaded); "
        "with a served source, used (when present) to check the service hosts this teacher"
    )
    served_as: str | None = Field(
        None, description="the teacher's name on the teacher service (default: `name`)"
    )
    train_if_missing: bool = Field(
        True,
        description="train this teacher on the experiment's data when its checkpoint is missing; false: a "
        "missing checkpoint is an error (for published weights, e.g. ImageNet teachers)",
    )
    seed: int = Field(0, ge=0, description="seed for training this teacher when its checkpoint is missing")
    train_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="share of the training split this teacher is (or was) trained on; None: the "
        "experiment's data.train_fraction, so a limited-data experiment's teachers see only its subset",
    )
    train: OptimConfig = Field(
        default_factory=lambda: OptimConfig(epochs=30),
        description="how to train this teacher when its checkpoint is missing",
    )

    @field_validator("name")
    @classmethod
    def _known_teacher(cls, name: str) -> str:
        return check_teacher_name(name)


class TeacherSourceConfig(_Section):
    kind: Literal["in_process", "served", "bank"] = Field(
        "in_process",
        description="where teacher outputs come from: in_process runs the teachers in this process "
        "(the baseline); served reads the shared cache first and asks the teacher "
        "service for the misses; bank reads a bank `ekd warm` filled (`cache`), with no service: a miss "
        "is an error, or computed here (`on_miss`)",
    )
    address: str | None = Field(
        None,
        description="served: the teacher service's gRPC address, host:port "
        "(`ekd distill --teacher-service` sets it)",
    )
    cache: str | None = Field(
        None,
        description="served: URI of the output cache the service writes "
        "(lmdb:///path or redis://host:port/db; ${VAR} expands from the environment); "
        "None: ask the service for everything. bank: the bank's URI (required)",
    )
    on_miss: Literal["error", "compute"] = Field(
        "error",
        description="bank: a view the bank lacks: error stops the run (one line: how many views of the "
        "batch are missing and the `ekd warm` command that fills them); compute runs the teachers here for "
        "the missing outputs and writes them to the bank",
    )
    soft_labels: Literal["full", "compact", "quantized"] = Field(
        "full",
        description="the form of the teacher logits the student learns from: full (every logit), compact "
        "(services/formats/soft_labels.py: the top logits and the tail's log-sum-exp, 63 bytes a view "
        "for 1000 classes) or quantized (services/formats/quantized_logits.py: every logit to 7-12 bits, "
        "910 bytes a view, KD loss within 1 % at T <= 4); the form `ekd warm` writes and, served, the "
        "form the service streams and caches (compact; quantized is in process or from a bank)",
    )
    prefetch_batches: int = Field(
        2,
        ge=0,
        le=64,
        description="batches of teacher outputs fetched ahead while the "
        "student trains (0: fetch in the training thread)",
    )
    timeout_seconds: float = Field(
        120.0,
        gt=0,
        description="served: deadline of each call to the service; a call past it (a frozen or overloaded "
        "service) is an outage: the batch is asked again, within outage_wait_seconds",
    )
    max_in_flight: int = Field(
        2,
        ge=1,
        le=64,
        description="served: Infer requests kept outstanding at the service (and batches submitted ahead "
        "by the prefetcher), so that its teachers batch and compute the next while one streams back",
    )
    outage_wait_seconds: float = Field(
        600.0,
        ge=0,
        le=86_400,
        description="served: how long a run waits for a teacher service it cannot reach (not up yet, "
        "restarting, redeployed), asking again for the same batch with exponential backoff, before it stops "
        "with an error; per outage (0: stop at once). `ekd warm`: how long each writer waits for a cache "
        "that does not answer",
    )
    outage_backoff_max_seconds: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="served: the longest pause between two attempts while waiting for the teacher service "
        "(the pauses start at 1 s and double up to this); `ekd warm`: the same, waiting for the cache",
    )

    @field_validator("cache")
    @classmethod
    def _expanded_cache(cls, uri: str | None) -> str | None:
        return expand_environment(uri) if uri else None

    @property
    def shown_address(self) -> str | None:
        """`address` fit to print (`redact`)."""
        return redact(self.address) if self.address else None

    @property
    def shown_cache(self) -> str | None:
        """`cache` fit to print: its password (redis://:password@host) replaced by ***."""
        return redact(self.cache) if self.cache else None

    @model_validator(mode="after")
    def _served_needs_address(self) -> TeacherSourceConfig:
        if self.kind == "served" and not self.address:
            raise ValueError(
                "teacher_source.kind 'served' needs `address` (host:port of the teacher service)"
            )
        if self.kind == "bank" and not self.cache:
            raise ValueError(
                "teacher_source.kind 'bank' needs `cache` (the URI of the bank `ekd warm` filled)"
            )
        if self.kind == "served" and self.soft_labels == "quantized":
            raise ValueError(
                "teacher_source.soft_labels 'quantized' is taken in process or from a bank (kind 'bank', "
                "filled by `ekd warm`); the teacher service streams full and compact logits"
            )
        return self


class ExecutionConfig(_Section):
    backend: Literal["local", "ray_train"] = Field(
        "local",
        description="local: this process, plain PyTorch; ray_train: Ray Train TorchTrainer workers (DDP)",
    )
    workers: int = Field(
        2, ge=1, le=256, description="ray_train: number of training workers, one data shard each"
    )
    cpus_per_worker: float = Field(
        1.0, gt=0, description="ray_train: CPUs Ray reserves for each worker (its data loading included)"
    )
    max_failures: int = Field(
        2,
        ge=0,
        le=100,
        description="ray_train: worker-group restarts allowed; each resumes from the last epoch checkpoint",
    )
    storage_path: str = Field(
        "runs/ray", description="ray_train: where Ray Train keeps run state and checkpoints"
    )
    placement_strategy: Literal["PACK", "SPREAD"] = Field(
        "PACK",
        description="ray_train: where the workers go on a cluster; PACK: on as few nodes as fit them "
        "(fastest all-reduce); SPREAD: one per node as far as there are nodes, so that losing a node loses "
        "fewest workers, and a restarted group packs onto the nodes left",
    )


# Every registered method's params, told apart by their `name` field. The union is built from the registry
# when this module is imported, which a type checker cannot evaluate: it sees what every member has instead.
if TYPE_CHECKING:
    MethodConfig: TypeAlias = MethodParams
else:
    MethodConfig = Annotated[
        functools.reduce(operator.or_, (METHODS.get(name).params for name in METHODS.names())),
        Field(discriminator="name"),
    ]


# The most bytes in a file name on Linux filesystems (ext4, XFS, btrfs).
_MAX_NAME_BYTES = 255


def check_experiment_name(name: str) -> str:
    """`name` when it is one path component (results go to <output_dir>/<name>): not empty, "." or "..", no
    path separator, no NUL, at most 255 bytes in UTF-8; else ValueError saying why."""
    if name in ("", ".", ".."):
        raise ValueError(f"must be a file name, not {name!r}")
    if "/" in name or "\\" in name:
        raise ValueError("must be a single path component: no '/' or '\\'")
    if "\0" in name:
        raise ValueError("must not contain NUL")
    if len(name.encode()) > _MAX_NAME_BYTES:
        raise ValueError(f"must be at most {_MAX_NAME_BYTES} bytes in UTF-8, got {len(name.encode())}")
    return name


class ExperimentConfig(_Section):
    name: str = Field(
        description="experiment name, a single path component (no '/', not '.' or '..'): results go to "
        "<output_dir>/<name>"
    )
    seed: int = Field(0, ge=0, description="seed of the student's initialization and batch order")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when present, else cpu")
    data: DataConfig = Field(default_factory=DataConfig)
    teachers: list[TeacherConfig] = Field(default_factory=list, description="the teacher ensemble, in order")
    method: MethodConfig
    train: OptimConfig = Field(default_factory=OptimConfig, description="student optimization")
    teacher_source: TeacherSourceConfig = Field(default_factory=TeacherSourceConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    output_dir: str = Field("runs", description="where results, plots and exported students are written")

    @field_validator("name")
    @classmethod
    def _single_path_component(cls, name: str) -> str:
        return check_experiment_name(name)

    def with_absolute_paths(self) -> ExperimentConfig:
        """This config with every path made absolute against the working directory: what a process elsewhere
        (a Ray worker, a Tune trial in its own directory) reads."""
        data = self.model_dump(mode="json")
        data["output_dir"] = str(Path(self.output_dir).absolute())
        if "://" not in self.execution.storage_path:  # Ray Train also takes URIs (s3://, gs://) as storage
            data["execution"]["storage_path"] = str(Path(self.execution.storage_path).absolute())
        if self.data.root is not None:
            data["data"]["root"] = str(Path(self.data.root).absolute())
        for teacher in data["teachers"]:
            teacher["checkpoint"] = str(Path(teacher["checkpoint"]).absolute())
        return ExperimentConfig.model_validate(data)

    def shown_json(self) -> dict:
        """The config as JSON data fit to print or record: secrets (the cache's password, credentials in the
        service address) replaced by ***. What results files and logs carry."""
        data = self.model_dump(mode="json")
        data["teacher_source"].update(
            address=self.teacher_source.shown_address, cache=self.teacher_source.shown_cache
        )
        return data

    @model_validator(mode="after")
    def _teachers_fit_method(self) -> ExperimentConfig:
        uses_teachers = METHODS.get(self.method.name).uses_teachers
        if uses_teachers and not self.teachers:
            raise ValueError(
                f"method {self.method.name!r} distills from teachers: list at least one under `teachers`"
            )
        if not uses_teachers and self.teachers:
            raise ValueError(f"method {self.method.name!r} uses no external teacher: remove `teachers`")
        return self


def load_experiment(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read and validate an experiment YAML; every problem becomes one ConfigError naming the file and
    fields."""
    return load_yaml_model(path, ExperimentConfig, what="experiment", overrides=overrides)


def alone_experiment_name(experiment: str, student: StudentConfig) -> str:
    """`<experiment>-alone-<arch>[-<option><value>...]`: the baseline of one network of `experiment`."""
    parts = [student.arch.replace(":", "_")]
    for key, value in sorted(student.options.items()):
        if value is True:
            parts.append(key)
        elif isinstance(value, (list, tuple)):
            parts.append(f"{key}{'.'.join(str(v) for v in value)}")
        else:
            parts.append(f"{key}{value}")
    return f"{experiment}-alone-" + "-".join(parts)
