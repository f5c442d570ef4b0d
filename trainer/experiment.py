"""One experiment, start to end, in plain PyTorch: data, teachers (trained first when missing), the teacher
source, the method, its training stages, evaluation, export, and the result record."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.progress import Progress

from trainer.config import DataConfig, ExperimentConfig, TeacherConfig
from trainer.data import DatasetSplits, ReplayedViews, load_dataset
from trainer.loop import (eval_loader, evaluate, make_optimizer, make_scheduler, resolve_device, train_epoch,
                          train_loader)
from trainer.methods import create_method
from trainer.sources import InProcessTeacherSource, TeacherSource
from trainer.students import count_parameters
from trainer.teachers import load_teachers, train_teacher

Log = Callable[[str], None]


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


def _unique_parameter_count(modules) -> int:
    seen = {id(p): p.numel() for m in modules for p in m.parameters()}
    return sum(seen.values())


def load_splits(data: DataConfig) -> DatasetSplits:
    return load_dataset(data.dataset, root=data.root, image_size=data.image_size, seed=data.split_seed,
                        val_fraction=data.val_fraction, test_fraction=data.test_fraction,
                        fake_samples=data.fake_samples)


def ensure_teachers(cfg: ExperimentConfig, splits: DatasetSplits, device: torch.device, log: Log,
                    progress: Progress | None, force: bool = False) -> None:
    """Train every teacher whose checkpoint is missing (or all, with force), saying so."""
    for teacher in cfg.teachers:
        if Path(teacher.checkpoint).is_file() and not force:
            continue
        log(f"teacher {teacher.name}: no checkpoint at {teacher.checkpoint}, training it "
            f"({teacher.train.epochs} epochs)" if not force else f"teacher {teacher.name}: retraining")
        result = _train_one_teacher(teacher, cfg, splits, device, progress)
        log(f"teacher {teacher.name}: saved {result.checkpoint} (val accuracy {result.val_accuracy:.2%}, "
            f"{result.seconds:.0f} s)")


def _train_one_teacher(teacher: TeacherConfig, cfg: ExperimentConfig, splits: DatasetSplits,
                       device: torch.device, progress: Progress | None):
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


def run_experiment(cfg: ExperimentConfig, *, log: Log = print, progress: Progress | None = None,
                   source: TeacherSource | None = None) -> ExperimentResult:
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    splits = load_splits(cfg.data)
    teachers = []
    if cfg.teachers:
        ensure_teachers(cfg, splits, device, log, progress)
        teachers = load_teachers(cfg.teachers, splits.num_classes)
        source = source or InProcessTeacherSource(teachers, device)
    infos = source.describe(splits.image_size) if teachers else []
    torch.manual_seed(cfg.seed)
    method = create_method(cfg.method, num_classes=splits.num_classes, in_chans=splits.in_chans,
                           teachers=infos).to(device)
    views = ReplayedViews(splits.train, seed=cfg.data.replay_seed, views=cfg.data.views, pad=cfg.data.pad,
                          hflip=cfg.data.hflip)
    steps_per_epoch = -(-len(views) // cfg.data.batch_size)
    epochs = cfg.train.epochs
    task = (progress.add_task(f"{cfg.name}", total=epochs * method.num_stages * steps_per_epoch)
            if progress else None)
    history, stall, val_accuracy = [], 0.0, 0.0
    for stage in range(method.num_stages):
        method.set_stage(stage)
        optimizer = make_optimizer(method.param_groups(cfg.train.lr), cfg.train)
        scheduler = make_scheduler(optimizer, cfg.train, epochs * steps_per_epoch)
        for epoch in range(epochs):
            on_step = (lambda m: progress.advance(task)) if progress is not None else None
            stats = train_epoch(method, train_loader(views, cfg.data.batch_size, cfg.seed, epoch), source,
                                optimizer, scheduler, epoch=epoch, total_epochs=epochs, mean=splits.mean,
                                std=splits.std, device=device, on_step=on_step)
            stall += stats.stall_seconds
            val_accuracy = evaluate(method.predict, method, eval_loader(splits.val, 256), splits.mean,
                                    splits.std, device)
            history.append({"stage": stage, "epoch": epoch, "loss": stats.loss, "val_accuracy": val_accuracy,
                            **stats.terms})
            if progress is not None:
                progress.update(task, description=f"{cfg.name} stage {stage + 1}/{method.num_stages} "
                                                  f"epoch {epoch + 1}/{epochs} val {val_accuracy:.1%}")
    test_loader = eval_loader(splits.test, 256)
    test_accuracy = evaluate(method.predict, method, test_loader, splits.mean, splits.std, device)
    run_dir = Path(cfg.output_dir) / cfg.name
    (run_dir / "students").mkdir(parents=True, exist_ok=True)
    exported = []
    for name, student in method.exported_students().items():
        path = run_dir / "students" / f"{name}.pt"
        torch.save({"format": "ekd.student.v1", "method": cfg.method.name, "name": name,
                    "state_dict": {k: v.cpu() for k, v in student.state_dict().items()}}, path)
        acc = evaluate(student, student, test_loader, splits.mean, splits.std, device)
        exported.append(ExportedStudent(name, count_parameters(student), acc, str(path)))
    teacher_accuracies = teacher_test_accuracies(source, len(teachers), splits) if teachers else []
    teacher_summaries = [TeacherSummary(t.spec.name, count_parameters(t.model), acc)
                         for t, acc in zip(teachers, teacher_accuracies)]
    result = ExperimentResult(
        name=cfg.name, method=cfg.method.name, seed=cfg.seed, test_accuracy=test_accuracy,
        val_accuracy=val_accuracy,
        student_params=_unique_parameter_count(method.exported_students().values()),
        teachers=teacher_summaries, students=exported, seconds=time.perf_counter() - started,
        stall_seconds=stall, run_dir=str(run_dir), counters=source.counters() if teachers else {}, history=history)
    (run_dir / f"results_seed{cfg.seed}.json").write_text(json.dumps(result.to_json(), indent=2))
    return result
