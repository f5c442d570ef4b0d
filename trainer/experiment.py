"""One experiment, start to end, in plain PyTorch: data, teachers (trained first when missing), the teacher
source, the method, its training stages, evaluation, export, and the result record.

`run_experiment` runs it in this process (`execution.backend: local`) or hands it to the Ray Train adapter
(`ray_train`, trainer/ray_train.py, imported only then). Both run an `ExperimentSession`: one process's share
of the experiment, built once, then `fit` (stages × epochs, on all data or on one worker's shard, resumable
from a `training_state`) and `finish` (evaluate, export the students, write the record).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.progress import Progress
from torch import nn

from trainer.config import DataConfig, ExperimentConfig, TeacherConfig
from trainer.data import DatasetSplits, ReplayedViews, load_dataset
from trainer.loop import (
    Shard,
    all_reduce_counts,
    all_reduce_epoch_stats,
    eval_loader,
    evaluate,
    make_optimizer,
    make_scheduler,
    resolve_device,
    train_epoch,
    train_loader,
)
from trainer.methods import create_method
from trainer.methods.base import Method
from trainer.sources import TeacherSource, build_teacher_source
from trainer.students import count_parameters
from trainer.teachers import train_teacher

Log = Callable[[str], None]
EpochEndCallback = Callable[[dict[str, float]], None]  # called with the history row of the epoch just trained
StepModuleFactory = Callable[[Method], nn.Module]  # builds what computes each step's loss in a stage

TRAINING_STATE_FORMAT = "ekd.training_state.v1"


@dataclass
class ExportedStudent:
    name: str
    params: int
    test_accuracy: float
    path: str


@dataclass
class TeacherSummary:
    name: str
    params: int
    test_accuracy: float


@dataclass
class ExperimentResult:
    name: str
    method: str
    seed: int
    test_accuracy: float  # of the method's prediction (an ensemble where the method predicts with one)
    val_accuracy: float
    student_params: int  # parameters the prediction uses (shared parts counted once)
    teachers: list[TeacherSummary]
    students: list[ExportedStudent]
    seconds: float
    stall_seconds: float
    run_dir: str
    counters: dict[str, int] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

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


def _unique_parameter_count(modules) -> int:
    seen = {id(p): p.numel() for m in modules for p in m.parameters()}
    return sum(seen.values())


def load_splits(data: DataConfig) -> DatasetSplits:
    return load_dataset(
        data.dataset,
        root=data.root,
        image_size=data.image_size,
        seed=data.split_seed,
        val_fraction=data.val_fraction,
        test_fraction=data.test_fraction,
        fake_samples=data.fake_samples,
    )


def ensure_teachers(
    cfg: ExperimentConfig,
    splits: DatasetSplits,
    device: torch.device,
    log: Log,
    progress: Progress | None,
    force: bool = False,
) -> None:
    """Train every teacher whose checkpoint is missing (or all, with force), saying so."""
    for teacher in cfg.teachers:
        if Path(teacher.checkpoint).is_file() and not force:
            continue
        log(
            f"teacher {teacher.name}: no checkpoint at {teacher.checkpoint}, training it "
            f"({teacher.train.epochs} epochs)"
            if not force
            else f"teacher {teacher.name}: retraining"
        )
        result = _train_one_teacher(teacher, cfg, splits, device, progress)
        log(
            f"teacher {teacher.name}: saved {result.checkpoint} (val accuracy {result.val_accuracy:.2%}, "
            f"{result.seconds:.0f} s)"
        )


def _train_one_teacher(
    teacher: TeacherConfig,
    cfg: ExperimentConfig,
    splits: DatasetSplits,
    device: torch.device,
    progress: Progress | None,
):
    task = progress.add_task(f"teacher {teacher.name}", total=teacher.train.epochs) if progress else None

    def on_epoch(done: int, total: int, val: float) -> None:
        if progress is not None:
            progress.update(task, completed=done, description=f"teacher {teacher.name} val {val:.1%}")

    return train_teacher(teacher, splits, cfg.data, device=device, on_epoch=on_epoch)


def teacher_test_accuracies(source: TeacherSource, count: int, splits: DatasetSplits) -> list[float]:
    correct, total = [0] * count, 0
    for images, labels in eval_loader(splits.test, 256):
        outputs = source.fetch(images, [["logits"]] * count)
        for i, logits in enumerate(outputs.logits):
            correct[i] += (logits.argmax(1) == labels).sum().item()
        total += labels.shape[0]
    return [c / total for c in correct]


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
        infos = self.source.describe(splits.image_size) if self.source is not None else []
        torch.manual_seed(cfg.seed)
        self.method = create_method(
            cfg.method, num_classes=splits.num_classes, in_chans=splits.in_chans, teachers=infos
        ).to(device)
        self.views = ReplayedViews(
            splits.train,
            seed=cfg.data.replay_seed,
            views=cfg.data.views,
            pad=cfg.data.pad,
            hflip=cfg.data.hflip,
        )
        self.history: list[dict[str, float]] = []
        self.stall_seconds = 0.0
        self.val_accuracy = 0.0
        self.resumes = 0  # times this run resumed from a training state
        # Where training stands: the last epoch completed in `stage`, and that stage's optimizer and schedule.
        self.stage, self.epoch = 0, -1
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None

    @property
    def is_primary(self) -> bool:
        """Whether this process evaluates the test split, exports and records (worker 0, or the only one)."""
        return self.shard is None or self.shard.rank == 0

    def _train_loader(self, epoch: int):
        return train_loader(self.views, self.cfg.data.batch_size, self.cfg.seed, epoch, self.shard)

    def fit(
        self,
        *,
        resume: dict | None = None,
        make_step_module: StepModuleFactory | None = None,
        on_epoch_end: EpochEndCallback | None = None,
        progress: Progress | None = None,
    ) -> None:
        """Train every stage for `train.epochs` epochs, continuing after the epoch `resume` recorded.

        `make_step_module(method)` builds what computes each step's loss (e.g. a DistributedDataParallel
        wrapper); it is called after each stage is entered, since a stage may change which parameters train.
        """
        if resume is not None:
            self._restore(resume)
        method, epochs = self.method, self.cfg.train.epochs
        steps_per_epoch = len(self._train_loader(0))
        task = None
        if progress is not None:
            done = (self.stage * epochs + self.epoch + 1) * steps_per_epoch
            task = progress.add_task(
                self.cfg.name, total=epochs * method.num_stages * steps_per_epoch, completed=done
            )
        on_step = (lambda metrics: progress.advance(task)) if progress is not None else None
        first_stage = self.stage
        for stage in range(first_stage, method.num_stages):
            method.set_stage(stage)
            optimizer = make_optimizer(method.param_groups(self.cfg.train.lr), self.cfg.train)
            scheduler = make_scheduler(optimizer, self.cfg.train, epochs * steps_per_epoch)
            if resume is not None and stage == first_stage:
                optimizer.load_state_dict(resume["optimizer"])
                scheduler.load_state_dict(resume["scheduler"])
            else:
                self.epoch = -1
            self.stage, self.optimizer, self.scheduler = stage, optimizer, scheduler
            step_module = make_step_module(method) if make_step_module is not None else method
            for epoch in range(self.epoch + 1, epochs):
                stats = train_epoch(
                    method,
                    self._train_loader(epoch),
                    self.source,
                    optimizer,
                    scheduler,
                    epoch=epoch,
                    total_epochs=epochs,
                    mean=self.splits.mean,
                    std=self.splits.std,
                    device=self.device,
                    on_step=on_step,
                    step_module=step_module,
                    prefetch_batches=self.cfg.teacher_source.prefetch_batches,
                )
                if self.shard is not None and self.shard.world_size > 1:
                    stats = all_reduce_epoch_stats(stats)
                self.stall_seconds += stats.stall_seconds
                self.val_accuracy = evaluate(
                    method.predict,
                    method,
                    eval_loader(self.splits.val, 256),
                    self.splits.mean,
                    self.splits.std,
                    self.device,
                )
                self.epoch = epoch
                row = {
                    "stage": stage,
                    "epoch": epoch,
                    "loss": stats.loss,
                    "val_accuracy": self.val_accuracy,
                    "resumes": self.resumes,
                    **stats.terms,
                }
                self.history.append(row)
                if progress is not None:
                    progress.update(
                        task,
                        description=f"{self.cfg.name} stage {stage + 1}/"
                        f"{method.num_stages} epoch {epoch + 1}/{epochs} "
                        f"val {self.val_accuracy:.1%}",
                    )
                if on_epoch_end is not None:
                    on_epoch_end(row)

    def training_state(self) -> dict:
        """Where training stands after the last completed epoch, as tensors and plain data only (so that
        `torch.load(..., weights_only=True)` reads it back): what `fit(resume=...)` continues from."""
        if self.optimizer is None:
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
            "resumes": self.resumes,
            "rng": rng,
        }

    def _restore(self, state: dict) -> None:
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
        self.resumes = state["resumes"] + 1
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)

    def finish(self) -> ExperimentResult | None:
        """Evaluate on the test split, export the students and write the record; the result on the primary
        process, None on the other workers (every worker must call it: the counters are summed over them)."""
        counters = self.source.counters() if self.source is not None else {}
        if self.shard is not None and self.shard.world_size > 1:
            counters = all_reduce_counts(counters)
        if not self.is_primary:
            self._close_source()
            return None
        cfg, splits, method, device = self.cfg, self.splits, self.method, self.device
        test_loader = eval_loader(splits.test, 256)
        test_accuracy = evaluate(method.predict, method, test_loader, splits.mean, splits.std, device)
        run_dir = Path(cfg.output_dir) / cfg.name
        (run_dir / "students").mkdir(parents=True, exist_ok=True)
        exported = []
        for name, student in method.exported_students().items():
            path = run_dir / "students" / f"{name}.pt"
            # Plain data beside the tensors: enough to rebuild the network with create_method (the method's
            # config, classes, channels) and pick this student out of it by name.
            torch.save(
                {
                    "format": "ekd.student.v1",
                    "method": cfg.method.model_dump(mode="json"),
                    "name": name,
                    "num_classes": splits.num_classes,
                    "in_chans": splits.in_chans,
                    "state_dict": {k: v.cpu() for k, v in student.state_dict().items()},
                },
                path,
            )
            acc = evaluate(student, student, test_loader, splits.mean, splits.std, device)
            exported.append(ExportedStudent(name, count_parameters(student), acc, str(path)))
        teacher_summaries = []
        if self.source is not None:
            accuracies = teacher_test_accuracies(self.source, len(cfg.teachers), splits)
            teacher_summaries = [
                TeacherSummary(t.name, params, acc)
                for t, params, acc in zip(cfg.teachers, self.source.parameter_counts(), accuracies)
            ]
        self._close_source()
        result = ExperimentResult(
            name=cfg.name,
            method=cfg.method.name,
            seed=cfg.seed,
            test_accuracy=test_accuracy,
            val_accuracy=self.val_accuracy,
            student_params=_unique_parameter_count(method.exported_students().values()),
            teachers=teacher_summaries,
            students=exported,
            seconds=time.time() - self.started,
            stall_seconds=self.stall_seconds,
            run_dir=str(run_dir),
            counters={**counters, "resumes": self.resumes},
            history=self.history,
        )
        (run_dir / f"results_seed{cfg.seed}.json").write_text(json.dumps(result.to_json(), indent=2))
        return result

    def _close_source(self) -> None:
        if self.owns_source and self.source is not None:
            self.source.close()


def run_experiment(
    cfg: ExperimentConfig,
    *,
    log: Log = print,
    progress: Progress | None = None,
    source: TeacherSource | None = None,
    ray_address: str | None = None,
) -> ExperimentResult:
    """Run `cfg` on its `execution.backend`; `source` (local backend only) replaces the configured teacher
    source; `ray_address` (ray_train only) is a running Ray cluster to train on."""
    if cfg.execution.backend == "ray_train":
        if source is not None:
            raise ValueError(
                "a teacher source cannot be handed to backend 'ray_train': each worker builds "
                "its own from the config; pass source only with backend 'local'"
            )
        from trainer.ray_train import run_on_ray_train  # Ray is imported only by the backend that uses it

        return run_on_ray_train(cfg, log=log, progress=progress, ray_address=ray_address)
    started = time.time()
    device = resolve_device(cfg.device)
    splits = load_splits(cfg.data)
    if cfg.teachers and cfg.teacher_source.kind == "in_process":
        ensure_teachers(cfg, splits, device, log, progress)
    session = ExperimentSession(cfg, splits=splits, device=device, started=started, source=source)
    session.fit(progress=progress)
    return session.finish()
