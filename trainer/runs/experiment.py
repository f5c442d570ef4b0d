"""One experiment, start to end, in plain PyTorch: data, teachers (trained first when missing), the teacher
source, the method, its training stages, evaluation, export, and the result record.

`run_locally` runs it in this process (`execution.backend: local`); the Ray Train adapter
(trainer/runs/ray_train.py) runs it on workers; `trainer.runs.run.run_experiment` picks one. Both run an
`ExperimentSession`: one process's share of the experiment, built once, then `fit` (stages × epochs, on all
data or on one worker's shard, resumable from a `training_state`) and `finish` (evaluate, export the
students, write the record).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

import torch
from torch import nn

from services.core.contract import LOGITS
from services.core.errors import ConfigError
from services.teachers.zoo import create_teacher
from trainer.config import DataConfig, ExperimentConfig, TeacherConfig, alone_experiment_name
from trainer.data import DatasetSplits
from trainer.methods import create_method
from trainer.methods.base import Method
from trainer.runs.export import ExportedNetwork, save_student
from trainer.runs.inputs import load_splits, loader_settings, train_views
from trainer.runs.loop import (
    EVAL_BATCH_SIZE,
    LoaderSettings,
    Shard,
    StepSettings,
    StudentTraining,
    all_reduce_counts,
    all_reduce_epoch_stats,
    eval_loader,
    evaluate,
    make_optimizer,
    make_scheduler,
    readable_batches,
    resolve_device,
    resolved_epochs,
    train_epoch,
    train_loader,
)
from trainer.runs.progress import OnProgress, ProgressUpdate
from trainer.runs.sources import TeacherSource, build_teacher_source
from trainer.runs.teachers import recorded_training_data, teacher_training_data, train_teacher
from trainer.students import count_parameters

# Called with the history row of the epoch just trained (by run_locally: with the source's counters so far).
EpochEndCallback = Callable[[dict[str, float]], None]
StepModuleFactory = Callable[[Method], nn.Module]  # builds what computes each step's loss in a stage

TRAINING_STATE_FORMAT = "ekd.training_state.v2"

logger = logging.getLogger(__name__)


@dataclass
class ExportedStudent:
    name: str
    params: int
    test_accuracy: float
    path: str
    # The same network as a student config (JSON data), and the name of the experiment that trains it alone
    # with CE (a linked run, trainer.results.baselines); None for an ensemble.
    alone_network: dict | None = None
    alone: str | None = None


@dataclass
class TeacherSummary:
    name: str
    params: int
    test_accuracy: float
    # What the teacher's checkpoint records it was trained on (dataset, split_seed, val_fraction,
    # train_fraction); None: the checkpoint records nothing (published weights, or older ekd checkpoints).
    training_data: dict | None = None
    # The teacher's identity (TeacherSpec.identity: the key its outputs are banked under); None: no local
    # checkpoint to compute it from (a served teacher known only by its name on the service).
    identity: str | None = None


@dataclass
class ExperimentResult:
    name: str
    method: str
    seed: int
    test_accuracy: float  # of the method's prediction: its headline export's
    val_accuracy: float | None  # None: no validation split (data.val_fraction 0)
    student_params: int  # parameters the prediction uses (shared parts counted once)
    teachers: list[TeacherSummary]
    students: list[ExportedStudent]
    seconds: float
    stall_seconds: float
    run_dir: str
    # The teacher source's totals over the whole run, the part a resumed run continued included (ints, but
    # for the seconds counted), and the run's resumes.
    counters: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    headline: str = ""  # the exported student whose accuracy is test_accuracy
    train_samples: int = 0  # images in the training split (after data.train_fraction)
    optimizer_steps: int = 0  # optimizer steps taken, over every stage
    config: dict = field(default_factory=dict)  # the experiment's config, as JSON data, secrets redacted

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ExperimentResult:
        return cls(
            **{
                **data,
                "teachers": [TeacherSummary(**t) for t in data["teachers"]],
                "students": [ExportedStudent(**s) for s in data["students"]],
            }
        )


def ensure_teachers(
    cfg: ExperimentConfig,
    splits: DatasetSplits,
    device: torch.device,
    on_progress: OnProgress | None = None,
    force: bool = False,
) -> None:
    """Train every teacher whose checkpoint is missing (or all, with force), saying so, on its training
    data (`teacher_training_data`: the experiment's subset unless the teacher's `train_fraction` says
    otherwise). A missing checkpoint of a teacher with `train_if_missing: false`, or an existing one that
    records other training data than asked for, is a ConfigError."""
    for index, teacher in enumerate(cfg.teachers):
        wanted = teacher_training_data(teacher, cfg.data)
        if Path(teacher.checkpoint).is_file() and not force:
            check_teacher_training_data(index, teacher, wanted, cfg.data)
            continue
        if not teacher.train_if_missing and not force:
            raise ConfigError(
                f"teacher {teacher.name}: no checkpoint at {teacher.checkpoint} (train_if_missing is false); "
                f"put its published weights there or point --set teachers.N.checkpoint=PATH at them"
            )
        if force:
            logger.info("teacher %s: retraining", teacher.name)
        else:
            logger.info(
                "teacher %s: no checkpoint at %s, training it (%d epochs)",
                teacher.name,
                teacher.checkpoint,
                teacher.train.epochs,
            )
        task = f"teacher {teacher.name}"

        def on_epoch(done: int, total: int, val: float | None, task: str = task) -> None:
            if on_progress is not None:
                shown = task if val is None else f"{task} val {val:.1%}"
                on_progress(ProgressUpdate(task, done, total, shown))

        own_splits = (
            splits
            if wanted["train_fraction"] == cfg.data.train_fraction
            else load_splits(cfg, wanted["train_fraction"])
        )
        result = train_teacher(teacher, own_splits, cfg.data, device=device, on_epoch=on_epoch)
        logger.info(
            "teacher %s: saved %s (trained on %d images, %s, %.0f s)",
            teacher.name,
            result.checkpoint,
            len(own_splits.train),
            "no validation split"
            if result.val_accuracy is None
            else f"val accuracy {100 * result.val_accuracy:.2f}%",
            result.seconds,
        )


def check_teacher_training_data(index: int, teacher: TeacherConfig, wanted: dict, data: DataConfig) -> None:
    """Refuse an existing checkpoint trained on other data than `wanted`; on a subset of the training
    split (train_fraction < 1), also one recording nothing (it may have seen images the subset leaves out)."""
    recorded = recorded_training_data(teacher.checkpoint)
    field_name = f"teachers.{index}"
    if recorded is not None and recorded != wanted:
        differing = ", ".join(
            f"{key} {recorded.get(key)!r} (asked for {value!r})"
            for key, value in wanted.items()
            if recorded.get(key) != value
        )
        raise ConfigError(
            f"{field_name} ({teacher.name}): checkpoint {teacher.checkpoint} was trained on other data: "
            f"{differing}; point {field_name}.checkpoint at another file (trained when missing) or set "
            f"{field_name}.train_fraction to the fraction it was trained on"
        )
    if recorded is None and wanted["train_fraction"] < 1 and teacher.train_fraction is None:
        raise ConfigError(
            f"{field_name} ({teacher.name}): checkpoint {teacher.checkpoint} records no training data, and "
            f"this experiment trains on data.train_fraction {data.train_fraction}: point "
            f"{field_name}.checkpoint at a file of its own (trained on the same subset when missing), or set "
            f"{field_name}.train_fraction (e.g. 1.0) to say what the checkpoint was trained on"
        )


def teacher_test_accuracies(
    source: TeacherSource, count: int, splits: DatasetSplits, loading: LoaderSettings
) -> list[float]:
    correct, total = [0] * count, 0
    for (images, labels, *_), _skipped in readable_batches(
        eval_loader(splits.test, EVAL_BATCH_SIZE, loading)
    ):
        outputs = source.fetch(images, [[LOGITS]] * count)
        for i, logits in enumerate(outputs.logits):
            assert isinstance(logits, torch.Tensor)  # every teacher's logits, asked for in full
            correct[i] += (logits.argmax(1) == labels).sum().item()
        total += labels.shape[0]
    return [c / total for c in correct]


class _StepProgress:
    """Turns a session's steps and epochs into `ProgressUpdate`s for one bar over all its stages."""

    def __init__(self, session: ExperimentSession, on_progress: OnProgress | None) -> None:
        self.session = session
        self.on_progress = on_progress
        epochs, stages = session.cfg.train.epochs, session.method.num_stages
        self.steps_per_epoch = session.steps_per_epoch if on_progress is not None else 0
        self.total = epochs * stages * self.steps_per_epoch
        self.completed = (session.stage * epochs + session.epoch + 1) * self.steps_per_epoch
        self.description = session.cfg.name

    def step(self) -> None:
        if self.on_progress is not None:
            self.completed += 1
            self._report(self.on_progress)

    def epoch_done(self, row: dict[str, float]) -> None:
        if self.on_progress is not None:
            session = self.session
            self.description = (
                f"{session.cfg.name} stage {session.stage + 1}/{session.method.num_stages} "
                f"epoch {session.epoch + 1}/{session.cfg.train.epochs}"
            )
            if "val_accuracy" in row:
                self.description += f" val {row['val_accuracy']:.1%}"
            self._report(self.on_progress)

    def _report(self, on_progress: OnProgress) -> None:
        on_progress(ProgressUpdate(self.session.cfg.name, self.completed, self.total, self.description))


class ExperimentSession:
    """One process's share of an experiment whose teachers have checkpoints: the method, its teacher source
    and its data, trained by `fit` and evaluated, exported and recorded by `finish`.

    With a `shard`, this process is worker `shard.rank` of a data-parallel group (a torch.distributed process
    group must exist): it trains on its shard of every epoch, the epoch statistics and source counters are
    summed over the workers, and worker 0 alone evaluates the test split, exports and writes the record.
    `started` is the wall-clock time (`time.time()`) the experiment started, on whichever process started it.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        *,
        splits: DatasetSplits,
        device: torch.device,
        started: float,
        source: TeacherSource | None = None,
        shard: Shard | None = None,
    ) -> None:
        self.cfg = cfg
        self.splits = splits
        self.device = device
        self.started = started
        self.shard = shard
        self.owns_source = source is None  # a source handed in stays open for its owner
        self.source = source or (
            build_teacher_source(cfg, splits.num_classes, device) if cfg.teachers else None
        )
        self.teacher_infos = self.source.describe(splits.image_size) if self.source is not None else []
        torch.manual_seed(cfg.seed)
        self.method = create_method(
            cfg.method, num_classes=splits.num_classes, in_chans=splits.in_chans, teachers=self.teacher_infos
        )
        self.method.label_smoothing = cfg.train.label_smoothing
        self.settings = StepSettings.resolve(cfg.train, device)
        memory_format = torch.channels_last if self.settings.channels_last else torch.preserve_format
        # Module.to takes the device and the memory format in one call, but is typed for one or the other.
        self.method.to(device).to(memory_format=memory_format)
        self.views = train_views(splits, cfg.data)
        self.loading = loader_settings(cfg.data, device)
        # From here on `cfg.train.epochs` is what trains: `train.steps` turned into whole epochs.
        epochs = resolved_epochs(cfg.train, self.steps_per_epoch)
        self.cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs})})
        self.history: list[dict[str, float]] = []
        self.stall_seconds = 0.0
        self.val_accuracy: float | None = None
        self.optimizer_steps = 0
        self.resumes = 0  # times this run resumed from a training state
        # The source's counters (over all workers) of the run this one resumed, and of the run up to the last
        # epoch trained here: what the training state records, so that a resumed run reports true totals.
        self.counters_resumed: dict[str, float] = {}
        self.counters_at_epoch_end: dict[str, float] = {}
        # Where training stands: the last epoch completed in `stage`, and that stage's optimizer and schedule.
        self.stage, self.epoch = 0, -1
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    @property
    def is_primary(self) -> bool:
        """Whether this process evaluates the test split, exports and records (worker 0, or the only one)."""
        return self.shard is None or self.shard.rank == 0

    def _train_loader(self, epoch: int):
        return train_loader(
            self.views, self.cfg.data.batch_size, self.cfg.seed, epoch, self.shard, self.loading
        )

    def fit(
        self,
        *,
        resume: dict | None = None,
        make_step_module: StepModuleFactory | None = None,
        on_epoch_end: EpochEndCallback | None = None,
        on_progress: OnProgress | None = None,
    ) -> None:
        """Train every stage for `train.epochs` epochs, continuing after the epoch `resume` recorded.

        `make_step_module(method)` builds what computes each step's loss (e.g. a DistributedDataParallel
        wrapper); it is called after each stage is entered, since a stage may change which parameters train.
        `on_progress` hears of every step.
        """
        if resume is not None:
            self.resume(resume)
        tracker = _StepProgress(self, on_progress)
        first_stage = self.stage
        for stage in range(first_stage, self.method.num_stages):
            self.enter_stage(stage, resume if stage == first_stage else None)
            step_module = make_step_module(self.method) if make_step_module is not None else self.method
            if self.cfg.train.compile:
                # An OptimizedModule, an nn.Module; torch.compile types it as the callable it wraps.
                step_module = cast(nn.Module, torch.compile(step_module))
            for epoch in range(self.epoch + 1, self.cfg.train.epochs):
                row = self.train_one_epoch(epoch, step_module, tracker.step)
                tracker.epoch_done(row)
                if on_epoch_end is not None:
                    on_epoch_end(row)

    def enter_stage(self, stage: int, resume: dict | None = None) -> None:
        """Set up training stage `stage`: the method's stage, a fresh optimizer and schedule, or the ones
        `resume` recorded (then training continues after its epoch)."""
        self.method.set_stage(stage)
        optimizer = make_optimizer(self.method.param_groups(self.cfg.train.lr), self.cfg.train)
        optimizer_steps = -(-self.steps_per_epoch // self.cfg.train.accumulate_steps)
        scheduler = make_scheduler(
            optimizer,
            self.cfg.train,
            self.cfg.train.epochs * optimizer_steps,
            warmup_steps=round(self.cfg.train.warmup_epochs * optimizer_steps),
        )
        if resume is not None:
            optimizer.load_state_dict(resume["optimizer"])
            scheduler.load_state_dict(resume["scheduler"])
        else:
            self.epoch = -1
        self.stage, self.optimizer, self.scheduler = stage, optimizer, scheduler

    def train_one_epoch(
        self, epoch: int, step_module: nn.Module, on_step: Callable[[], None] | None = None
    ) -> dict[str, float]:
        """Train epoch `epoch` of the current stage, evaluate on the validation split, and return the epoch's
        history row (also appended to `history`)."""
        if self.optimizer is None:
            raise ValueError("no optimizer before a training stage is entered (enter_stage)")
        training = StudentTraining(
            self.method,
            self.optimizer,
            self.scheduler,
            self.device,
            self.splits.mean,
            self.splits.std,
            settings=self.settings,
            step_module=step_module,
            soft_labels=self.cfg.teacher_source.soft_labels,
        )
        stats = train_epoch(
            training,
            self._train_loader(epoch),
            self.source,
            epoch=epoch,
            total_epochs=self.cfg.train.epochs,
            prefetch_batches=self.cfg.teacher_source.prefetch_batches,
            on_step=on_step,
        )
        if self.shard is not None and self.shard.world_size > 1:
            stats = all_reduce_epoch_stats(stats)
        self.stall_seconds += stats.stall_seconds
        self.optimizer_steps += stats.optimizer_steps
        self.counters_at_epoch_end = self.counters()
        self.val_accuracy = self.evaluate_validation()
        self.epoch = epoch
        row = {
            "stage": self.stage,
            "epoch": epoch,
            "loss": stats.loss,
            "train_accuracy": stats.train_accuracy,
        }
        if self.val_accuracy is not None:
            row["val_accuracy"] = self.val_accuracy
        row.update(
            resumes=self.resumes,
            skipped_images=stats.skipped_images,
            stall_seconds=stats.stall_seconds,
            **stats.terms,
        )
        self.history.append(row)
        logger.debug("%s: %s", self.cfg.name, ", ".join(f"{k} {v:.4g}" for k, v in row.items()))
        return row

    def evaluate_validation(self) -> float | None:
        """Accuracy of the method's prediction on the validation split; None without one."""
        if len(self.splits.val) == 0:
            return None
        return evaluate(
            self.method.predict,
            self.method,
            eval_loader(self.splits.val, EVAL_BATCH_SIZE, self.loading),
            self.splits.mean,
            self.splits.std,
            self.device,
        )

    @property
    def steps_per_epoch(self) -> int:
        return len(self._train_loader(0))

    def training_state(self) -> dict:
        """Where training stands after the last completed epoch, as tensors and plain data only (so that
        `torch.load(..., weights_only=True)` reads it back): what `fit(resume=...)` continues from. It holds
        the teacher source's counters up to that epoch, so that the resumed run's record counts the whole
        run."""
        if self.optimizer is None or self.scheduler is None:
            raise ValueError("no training state before the first epoch of fit has run")
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": TRAINING_STATE_FORMAT,
            "stage": self.stage,
            "epoch": self.epoch,
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": self.history,
            "stall_seconds": self.stall_seconds,
            "val_accuracy": self.val_accuracy,
            "optimizer_steps": self.optimizer_steps,
            "resumes": self.resumes,
            "counters": self.counters_at_epoch_end,
            "rng": rng,
        }

    def resume(self, state: dict) -> None:
        """Continue from a `training_state()`: the method's weights, where training stands, the history, the
        counters so far."""
        if state.get("format") != TRAINING_STATE_FORMAT:
            raise ValueError(
                f"training state format {state.get('format')!r} is not {TRAINING_STATE_FORMAT!r}"
            )
        if not 0 <= state["stage"] < self.method.num_stages:
            raise ValueError(
                f"training state is at stage {state['stage']}, but {self.cfg.method.name} has "
                f"stages 0..{self.method.num_stages - 1}"
            )
        self.method.load_state_dict(state["method"])
        self.stage, self.epoch = state["stage"], state["epoch"]
        self.history = list(state["history"])
        self.stall_seconds, self.val_accuracy = state["stall_seconds"], state["val_accuracy"]
        self.optimizer_steps = state["optimizer_steps"]
        self.resumes = state["resumes"] + 1
        self.counters_resumed = dict(state["counters"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)

    def counters(self) -> dict[str, float]:
        """The teacher source's counters over the whole run: summed over the workers (every worker must
        call this), plus those of the run this one resumed."""
        counters = self.source.counters() if self.source is not None else {}
        if self.shard is not None and self.shard.world_size > 1:
            counters = all_reduce_counts(counters)
        return {name: value + self.counters_resumed.get(name, 0) for name, value in counters.items()}

    def finish(self) -> ExperimentResult | None:
        """Evaluate on the test split, export the students and write the record; the result on the primary
        process, None on the other workers (every worker must call it: the counters are summed over them)."""
        counters = self.counters()
        if not self.is_primary:
            self._close_source()
            return None
        cfg, splits, method, device = self.cfg, self.splits, self.method, self.device
        test_loader = eval_loader(splits.test, EVAL_BATCH_SIZE, self.loading)
        test_accuracy = evaluate(method.predict, method, test_loader, splits.mean, splits.std, device)
        run_dir = Path(cfg.output_dir) / cfg.name
        students_dir = run_dir / "students" / f"seed{cfg.seed}"
        students_dir.mkdir(parents=True, exist_ok=True)
        alone = method.alone_networks()
        exported = []
        network = ExportedNetwork(
            method=cfg.method.model_dump(mode="json"),
            name="",
            num_classes=splits.num_classes,
            in_chans=splits.in_chans,
            image_size=splits.image_size,
            mean=tuple(splits.mean),
            std=tuple(splits.std),
            teachers=self.teacher_infos,
        )
        for name, student in method.exported_students().items():
            path = students_dir / f"{name}.pt"
            save_student(path, student, dataclasses.replace(network, name=name))
            acc = evaluate(student, student, test_loader, splits.mean, splits.std, device)
            network_alone = alone[name].model_dump(mode="json") if name in alone else None
            baseline = alone_experiment_name(cfg.name, alone[name]) if name in alone else None
            exported.append(
                ExportedStudent(name, count_parameters(student), acc, str(path), network_alone, baseline)
            )
        teacher_summaries = []
        if self.source is not None:
            accuracies = teacher_test_accuracies(self.source, len(cfg.teachers), splits, self.loading)
            teacher_summaries = [
                TeacherSummary(
                    t.name,
                    params,
                    acc,
                    recorded_training_data(t.checkpoint),
                    teacher_identity(t, splits.num_classes),
                )
                for t, params, acc in zip(cfg.teachers, self.source.parameter_counts(), accuracies)
            ]
        self._close_source()
        result = ExperimentResult(
            name=cfg.name,
            method=cfg.method.name,
            seed=cfg.seed,
            test_accuracy=test_accuracy,
            val_accuracy=self.val_accuracy,
            student_params=count_parameters(method.exported_students()[method.headline()]),
            teachers=teacher_summaries,
            students=exported,
            seconds=time.time() - self.started,
            stall_seconds=self.stall_seconds,
            run_dir=str(run_dir),
            counters={**counters, "resumes": self.resumes},
            history=self.history,
            headline=method.headline(),
            train_samples=len(splits.train),
            optimizer_steps=self.optimizer_steps,
            config=cfg.shown_json(),
        )
        (run_dir / f"results_seed{cfg.seed}.json").write_text(json.dumps(result.to_json(), indent=2))
        return result

    def _close_source(self) -> None:
        if self.owns_source and self.source is not None:
            self.source.close()


def teacher_identity(teacher: TeacherConfig, num_classes: int) -> str | None:
    """`TeacherSpec.identity` of the teacher's local checkpoint; None when there is none."""
    if not Path(teacher.checkpoint).is_file():
        return None
    return create_teacher(teacher.name, num_classes, checkpoint=teacher.checkpoint).spec.identity


def run_locally(
    cfg: ExperimentConfig,
    *,
    on_progress: OnProgress | None = None,
    source: TeacherSource | None = None,
    on_epoch_end: EpochEndCallback | None = None,
) -> ExperimentResult:
    """Run `cfg` in this process (`execution.backend: local`); `source` replaces the configured teacher
    source (it stays open for its owner). `on_epoch_end` hears of every epoch: its history row and the
    teacher source's counters so far (what experiment tracking logs per epoch)."""
    started = time.time()
    device = resolve_device(cfg.device)
    splits = load_splits(cfg)
    if cfg.teachers and cfg.teacher_source.kind == "in_process":
        ensure_teachers(cfg, splits, device, on_progress)
    session = ExperimentSession(cfg, splits=splits, device=device, started=started, source=source)

    def epoch_metrics(row: dict[str, float]) -> None:
        if on_epoch_end is not None:
            on_epoch_end({**row, **session.counters_at_epoch_end})

    session.fit(on_progress=on_progress, on_epoch_end=epoch_metrics)
    result = session.finish()
    assert result is not None  # the only process is the primary one
    return result
