"""Datasets as uint8 pixels (`datasets`), image files decoded on access (`images`), replayed augmented views
(`views`) and the student's normalization (`normalize`)."""

from trainer.data.datasets import (
    DATASET_NAMES,
    FILE_DATASETS,
    DatasetName,
    DatasetNotFoundError,
    DatasetSplits,
    ImageTensorDataset,
    SplitDataset,
    describe,
    load_dataset,
)
from trainer.data.images import ImageFiles, UnreadableImageError
from trainer.data.normalize import normalize
from trainer.data.views import (
    CentreCrop,
    PadCrop,
    RandomResizedCrop,
    ReplayedViews,
    collate_readable,
)

__all__ = [
    "DATASET_NAMES",
    "FILE_DATASETS",
    "CentreCrop",
    "DatasetName",
    "DatasetNotFoundError",
    "DatasetSplits",
    "ImageFiles",
    "ImageTensorDataset",
    "PadCrop",
    "RandomResizedCrop",
    "ReplayedViews",
    "SplitDataset",
    "UnreadableImageError",
    "collate_readable",
    "describe",
    "load_dataset",
    "normalize",
]
