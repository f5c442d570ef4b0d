"""ekd's own teachers: trained on the labels when no checkpoint exists (nothing can be downloaded) and saved
as local checkpoints that the zoo loads with `weights_only=True`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from services.core.weights import WeightsFileError, read_weights_file
from services.teachers.checkpoints import CHECKPOINT_FORMAT
from services.teachers.spec import Preprocessing
from services.teachers.zoo import create_teacher, save_teacher_checkpoint
from trainer.config import DataConfig, TeacherConfig
from trainer.data import DatasetSplits
from trainer.methods.ce import CrossEntropyTraining
from trainer.runs.inputs import loader_settings, train_views
from trainer.runs.loop import (
    EVAL_BATCH_SIZE,
    StepSettings,
    StudentTraining,
    eval_loader,
    evaluate,
    make_optimizer,
    make_scheduler,
    resolved_epochs,
    train_epoch,
    train_loader,
)

logger = logging.getLogger(__name__)

EpochCallback = Callable[[int, int, float | None], None]  # (epoch done, total epochs, val accuracy or None)


@dataclass
class TeacherTrainingResult:
    name: str
    checkpoint: str
    val_accuracy: float | None  # None: no validation split
    seconds: float


def teacher_training_data(teacher: TeacherConfig, data: DataConfig) -> dict:
    """What a teacher is (or would be) trained on, as recorded in the checkpoints ekd writes: the dataset,
    its split, and the share of the training split (the teacher's own `train_fraction`, else the
    experiment's), and the seed of a subset drawn apart from the split (`data.subset_seed`)."""
    fraction = data.train_fraction if teacher.train_fraction is None else teacher.train_fraction
    recorded = {
        "dataset": data.dataset,
        "split_seed": data.split_seed,
        "val_fraction": data.val_fraction,
        "train_fraction": fraction,
    }
    if fraction < 1 and data.subset_seed is not None:
        recorded["subset_seed"] = data.subset_seed
    return recorded


def recorded_training_data(checkpoint: str) -> dict | None:
    """The training data an ekd teacher checkpoint records; None for a missing file, a file of published
    weights, or an ekd checkpoint written before checkpoints recorded it."""
    try:
        content = read_weights_file(checkpoint)
    except WeightsFileError:
        return None
    if not isinstance(content, dict) or content.get("format") != CHECKPOINT_FORMAT:
        return None
    return content.get("training_data")


def dataset_preprocessing(splits: DatasetSplits) -> Preprocessing:
    """The preprocessing a teacher trained on `splits` expects: the dataset's size and normalization."""
    return Preprocessing(
        input_size=splits.image_size, mean=tuple(splits.mean), std=tuple(splits.std), in_chans=splits.in_chans
    )


def train_teacher(
    cfg: TeacherConfig,
    splits: DatasetSplits,
    data: DataConfig,
    *,
    device: torch.device,
    on_epoch: EpochCallback | None = None,
) -> TeacherTrainingResult:
    seed = cfg.seed
    torch.manual_seed(seed)
    preprocessing = dataset_preprocessing(splits)
    model = create_teacher(cfg.name, splits.num_classes, preprocessing=preprocessing).model
    model.requires_grad_(True)
    settings = StepSettings.resolve(cfg.train, device)
    memory_format = torch.channels_last if settings.channels_last else torch.preserve_format
    # Module.to takes the device and the memory format in one call, but is typed for one or the other.
    method = CrossEntropyTraining(model).to(device).to(memory_format=memory_format)
    method.label_smoothing = cfg.train.label_smoothing
    views = train_views(splits, data)
    loading = loader_settings(data, device)
    optimizer = make_optimizer(method.param_groups(cfg.train.lr), cfg.train)
    batches = -(-len(views) // data.batch_size)
    optimizer_steps = -(-batches // cfg.train.accumulate_steps)
    epochs = resolved_epochs(cfg.train, batches)
    scheduler = make_scheduler(
        optimizer,
        cfg.train,
        epochs * optimizer_steps,
        warmup_steps=round(cfg.train.warmup_epochs * optimizer_steps),
    )
    training = StudentTraining(
        method, optimizer, scheduler, device, splits.mean, splits.std, settings=settings
    )
    seconds, val_accuracy = 0.0, None
    for epoch in range(epochs):
        stats = train_epoch(
            training,
            train_loader(views, data.batch_size, seed, epoch, loading=loading),
            None,
            epoch=epoch,
            total_epochs=epochs,
        )
        seconds += stats.seconds
        if len(splits.val):
            val_accuracy = evaluate(
                method.predict,
                method,
                eval_loader(splits.val, EVAL_BATCH_SIZE, loading),
                splits.mean,
                splits.std,
                device,
            )
        logger.debug("teacher %s epoch %d/%d: loss %.4f", cfg.name, epoch + 1, epochs, stats.loss)
        if on_epoch is not None:
            on_epoch(epoch + 1, epochs, val_accuracy)
    Path(cfg.checkpoint).parent.mkdir(parents=True, exist_ok=True)
    save_teacher_checkpoint(
        cfg.checkpoint,
        model.cpu(),
        cfg.name,
        splits.num_classes,
        preprocessing,
        training_data=teacher_training_data(cfg, data),
    )
    return TeacherTrainingResult(cfg.name, cfg.checkpoint, val_accuracy, seconds)
