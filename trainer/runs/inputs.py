"""From an experiment's data section to what training reads: the splits, the replayed training views and the
DataLoader settings. Teachers and students of one experiment get them here, so both see the same bytes."""

from __future__ import annotations

import logging

import torch

from services.teachers.spec import Preprocessing
from services.teachers.zoo import default_preprocessing
from trainer.config import DataConfig, ExperimentConfig
from trainer.data import (
    FILE_DATASETS,
    CentreCrop,
    DatasetSplits,
    ImageFiles,
    PadCrop,
    RandomResizedCrop,
    ReplayedViews,
    load_dataset,
)
from trainer.runs.loop import LoaderSettings

logger = logging.getLogger(__name__)


def student_normalization(cfg: ExperimentConfig) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The student's (mean, std): the config's; else, for datasets decoded on access (never passed over at
    start), the first teacher's preprocessing's, or ImageNet's; None: computed on an in-memory train split."""
    data = cfg.data
    if data.mean is not None and data.std is not None:
        return data.mean, data.std
    if data.dataset not in FILE_DATASETS:
        return None
    first = cfg.teachers[0].name if cfg.teachers else None
    preprocessing = default_preprocessing(first) if first is not None else Preprocessing.imagenet()
    logger.debug(
        "student normalization from %s: mean %s, std %s",
        first or "ImageNet",
        preprocessing.mean,
        preprocessing.std,
    )
    return preprocessing.mean, preprocessing.std


def load_splits(cfg: ExperimentConfig, train_fraction: float | None = None) -> DatasetSplits:
    """The experiment's splits; `train_fraction` replaces `data.train_fraction` (a teacher's own)."""
    data = cfg.data
    normalization = student_normalization(cfg)
    mean, std = normalization if normalization is not None else (None, None)
    return load_dataset(
        data.dataset,
        root=data.root,
        image_size=data.image_size,
        seed=data.split_seed,
        val_fraction=data.val_fraction,
        test_fraction=data.test_fraction,
        train_fraction=data.train_fraction if train_fraction is None else train_fraction,
        subset_seed=data.subset_seed,
        fake_samples=data.fake_samples,
        mean=mean,
        std=std,
        crop_pct=data.crop_pct,
        interpolation=data.interpolation,
        skip_unreadable=data.skip_unreadable,
    )


def train_views(splits: DatasetSplits, data: DataConfig) -> ReplayedViews:
    """The replayed training views: RandomResizedCrop of files decoded on access, pad-and-crop of in-memory
    images; without augmentation (`views: 0`), evaluation's centre crop of files, in-memory images as they
    are."""
    if not splits.decoded_on_access:
        return ReplayedViews(
            splits.train, seed=data.replay_seed, views=data.views, maker=PadCrop(data.pad, data.hflip)
        )
    if data.views == 0:
        assert isinstance(splits.train, ImageFiles)  # what load_dataset decodes on access
        centre = CentreCrop(data.image_size, data.crop_pct, data.interpolation)
        return ReplayedViews(
            splits.train.with_transform(centre), seed=data.replay_seed, views=0, maker=PadCrop(0, False)
        )
    crop = RandomResizedCrop(data.image_size, data.scale, data.ratio, data.hflip, data.interpolation)
    return ReplayedViews(splits.train, seed=data.replay_seed, views=data.views, maker=crop)


def loader_settings(data: DataConfig, device: torch.device) -> LoaderSettings:
    pin = device.type == "cuda" if data.pin_memory is None else data.pin_memory
    return LoaderSettings(workers=data.workers, pin_memory=pin, prefetch_factor=data.prefetch_factor)
