"""ekd's own teachers: trained on the labels when no checkpoint exists (nothing can be downloaded) and saved
as local checkpoints that the zoo loads with `weights_only=True`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from services.zoo import Preprocessing, create_teacher, save_teacher_checkpoint
from trainer.config import DataConfig, TeacherConfig
from trainer.data import DatasetSplits
from trainer.inputs import loader_settings, train_views
from trainer.loop import (
    EVAL_BATCH_SIZE,
    StepSettings,
    eval_loader,
    evaluate,
    make_optimizer,
    make_scheduler,
    train_epoch,
    train_loader,
)
from trainer.methods.ce import CrossEntropyTraining

logger = logging.getLogger(__name__)

EpochCallback = Callable[[int, int, float], None]  # (epoch done, total epochs, val accuracy)


@dataclass
class TeacherTrainingResult:
    name: str
    checkpoint: str
    val_accuracy: float
    seconds: float


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
    method = CrossEntropyTraining(model).to(device, memory_format=memory_format)
    method.label_smoothing = cfg.train.label_smoothing
    views = train_views(splits, data)
    loading = loader_settings(data, device)
    optimizer = make_optimizer(method.param_groups(cfg.train.lr), cfg.train)
    batches = -(-len(views) // data.batch_size)
    optimizer_steps = -(-batches // cfg.train.accumulate_steps)
    scheduler = make_scheduler(
        optimizer,
        cfg.train,
        cfg.train.epochs * optimizer_steps,
        warmup_steps=round(cfg.train.warmup_epochs * optimizer_steps),
    )
    seconds, val_accuracy = 0.0, 0.0
    for epoch in range(cfg.train.epochs):
        stats = train_epoch(
            method,
            train_loader(views, data.batch_size, seed, epoch, loading=loading),
            None,
            optimizer,
            scheduler,
            epoch=epoch,
            total_epochs=cfg.train.epochs,
            mean=splits.mean,
            std=splits.std,
            device=device,
            settings=settings,
        )
        seconds += stats.seconds
        val_accuracy = evaluate(
            method.predict,
            method,
            eval_loader(splits.val, EVAL_BATCH_SIZE, loading),
            splits.mean,
            splits.std,
            device,
        )
        logger.debug(
            "teacher %s epoch %d/%d: loss %.4f, val accuracy %.2f%%",
            cfg.name,
            epoch + 1,
            cfg.train.epochs,
            stats.loss,
            100 * val_accuracy,
        )
        if on_epoch is not None:
            on_epoch(epoch + 1, cfg.train.epochs, val_accuracy)
    Path(cfg.checkpoint).parent.mkdir(parents=True, exist_ok=True)
    save_teacher_checkpoint(cfg.checkpoint, model.cpu(), cfg.name, splits.num_classes, preprocessing)
    return TeacherTrainingResult(cfg.name, cfg.checkpoint, val_accuracy, seconds)
