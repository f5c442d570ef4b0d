"""Datasets as uint8 pixels: in memory (digits, CIFAR, fake) or decoded on access (ImageFolder layouts).

Everything the student and the teachers see is a uint8 image [3, S, S] (grayscale replicated to three
channels), so that a teacher's output can be keyed by a content hash of the exact input bytes and reused
across epochs and experiments. Normalization happens last, on the student's side only (`normalize`).

Digits, CIFAR and fake data are small: they are held in memory at the training size, and the student's
channel statistics are computed on the train split. `imagefolder` and `imagenet` are ImageFolder layouts of
any size: their files are listed once and decoded in DataLoader workers when asked for (`images.ImageFiles`);
nothing passes over the images at start, so the student's mean and std come from the caller (the config, or
the teachers' preprocessing). Their training views are made by `views.RandomResizedCrop`, their evaluation
images by `views.CentreCrop`.

Nothing here downloads: CIFAR and ImageFolder data are read from a local root, and a missing root raises
`DatasetNotFoundError` saying what to put where.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias, cast, get_args

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import InterpolationMode, v2

from services.core.errors import ConfigError, UserError
from trainer.data.digits import load_digits, stratified_split
from trainer.data.images import ImageFiles, list_image_folder
from trainer.data.views import CentreCrop, Interpolation

DatasetName = Literal["digits", "cifar10", "cifar100", "imagefolder", "imagenet", "fake"]
DATASET_NAMES: tuple[DatasetName, ...] = get_args(DatasetName)
FILE_DATASETS = ("imagefolder", "imagenet")  # decoded on access, never held in memory

# Resizing a whole dataset at once would hold a float copy of it; chunks bound that copy.
_RESIZE_CHUNK = 1024
_FAKE_NUM_CLASSES = 10


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A dataset's files are not under the given root; the message says what to place where."""


def _subset(dataset: Dataset, indices: np.ndarray) -> Subset:
    """`Subset` of the samples at `indices`, kept as an array: Subset only indexes it, though its signature
    says Sequence[int], which ndarray does not declare."""
    return Subset(dataset, cast(Sequence[int], indices))


class ImageTensorDataset(Dataset):
    """In-memory images: uint8 [N, 3, S, S] and int64 labels [N]; yields (uint8 [3, S, S], int label)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


# What a split is: images held in memory (a whole set, or a subset of a pool), or image files decoded on
# access. Each has a length, which torch's Dataset does not declare.
SplitDataset: TypeAlias = ImageTensorDataset | Subset[Any] | ImageFiles


@dataclass(frozen=True)
class DatasetSplits:
    """Train/val/test splits of one dataset; each yields (uint8 tensor [3, S, S], int label).

    `mean` and `std` are per channel, in [0, 1] pixel units, computed on the train split: the student's
    normalization (see `normalize`).
    """

    train: SplitDataset
    val: SplitDataset
    test: SplitDataset
    num_classes: int
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    name: str
    decoded_on_access: bool = False  # train items are PIL images of any size (ImageFiles), not tensors


def load_dataset(
    name: str,
    *,
    root: str | os.PathLike | None = None,
    image_size: int,
    seed: int,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    train_fraction: float = 1.0,
    subset_seed: int | None = None,
    fake_samples: int = 512,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_pct: float = 0.875,
    interpolation: Interpolation = "bilinear",
    skip_unreadable: bool = False,
) -> DatasetSplits:
    """Load dataset `name` as uint8 [3, image_size, image_size] splits, split deterministically by `seed`.

    `val_fraction` is the share of the training pool held out for validation (stratified by class; 0: none,
    the whole pool trains and `val` is empty). `train_fraction` keeps that share of the training split, per
    class (`limited_training_subset`), the limited-data regime: the held-out splits do not change with it.
    `subset_seed` draws that subset (None: `seed`), so that subsets can be redrawn while the split stays put.
    `test_fraction` applies only where a dataset has no official test split (digits, fake): the share of all
    samples held out for testing. CIFAR and ImageFolder keep their own test split. `fake_samples` is the total
    number of FakeData images.

    `mean` and `std` are the student's normalization: computed on the train split of in-memory datasets when
    not given; required for `imagefolder` and `imagenet`, whose images are never passed over at start. Those
    two evaluate on `CentreCrop(image_size, crop_pct, interpolation)` and skip unreadable files when
    `skip_unreadable` (else the first one is an `UnreadableImageError` naming it).
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASET_NAMES)}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if not isinstance(seed, int) or not 0 <= seed < 2**32:  # sklearn's random_state range
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction!r}")
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must lie in (0, 1], got {train_fraction!r}")
    if subset_seed is not None and not 0 <= subset_seed < 2**32:
        raise ValueError(f"subset_seed must be an int in [0, 2**32), got {subset_seed!r}")
    carving = _PoolSplit(seed, val_fraction, train_fraction, seed if subset_seed is None else subset_seed)
    if name in FILE_DATASETS:
        if mean is None or std is None:
            raise ValueError(f"{name} needs the student's mean and std: its images are not read at start")
        evaluation = CentreCrop(image_size, crop_pct, interpolation)
        return _load_image_folders(
            name, root, image_size, carving, evaluation, skip_unreadable, (tuple(mean), tuple(std))
        )
    if name == "digits":
        splits = _load_digits(image_size, carving, test_fraction)
    elif name in ("cifar10", "cifar100"):
        splits = _load_cifar(name, root, image_size, carving)
    else:
        splits = _load_fake(image_size, carving, test_fraction, fake_samples)
    if mean is not None and std is not None:
        return dataclasses.replace(splits, mean=tuple(mean), std=tuple(std))
    return splits


@dataclass(frozen=True)
class _PoolSplit:
    """How a training pool becomes the train and validation splits (the test split is set apart before)."""

    seed: int
    val_fraction: float
    train_fraction: float
    subset_seed: int  # draws the limited-data subset (train_fraction < 1)

    def split(self, indices: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(train, val) index arrays of the pool `indices` whose labels are `labels` (aligned)."""
        if self.val_fraction > 0:
            train, val = _stratified_split(indices, labels, self.val_fraction, self.seed)
        else:
            train, val = np.sort(indices), indices[:0]
        if self.train_fraction < 1:
            by_index = dict(zip(indices.tolist(), labels.tolist()))
            train_labels = np.asarray([by_index[i] for i in train.tolist()])
            train = limited_training_subset(train, train_labels, self.train_fraction, self.subset_seed)
        return train, val


def limited_training_subset(
    indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int
) -> np.ndarray:
    """The sorted indices kept when training on `fraction` of `indices`: round(fraction · n_c) of each
    class's n_c (at least one), drawn by a permutation seeded by `seed` alone, so that every experiment and
    teacher with the same seed trains on the same images, and a smaller fraction's subset lies within
    a larger one's."""
    rng = np.random.default_rng(seed)
    kept = []
    for label in np.unique(labels):
        members = indices[labels == label]
        order = rng.permutation(len(members))
        kept.append(members[order[: max(1, round(fraction * len(members)))]])
    return np.sort(np.concatenate(kept))


def _load_digits(image_size: int, carving: _PoolSplit, test_fraction: float) -> DatasetSplits:
    digits = load_digits()
    # load_digits pixels are counts 0..16 (of a 4x4 block of the original 32x32 bitmap); scale them to 0..255.
    pixels = torch.from_numpy(np.rint(digits.images * (255.0 / 16.0))).to(torch.uint8)
    images = _resize(pixels.unsqueeze(1), image_size).expand(-1, 3, -1, -1)
    pool = ImageTensorDataset(images, torch.from_numpy(digits.target))
    indices = np.arange(len(pool))
    rest, test = _stratified_split(indices, digits.target, test_fraction, carving.seed)
    train, val = carving.split(rest, digits.target[rest])
    return _splits(
        "digits",
        _subset(pool, train),
        _subset(pool, val),
        _subset(pool, test),
        image_size,
        tuple(str(name) for name in digits.target_names),
    )


def _load_cifar(
    name: str, root: str | os.PathLike | None, image_size: int, carving: _PoolSplit
) -> DatasetSplits:
    dataset_class = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    expected = [dataset_class.meta["filename"]]
    expected += [file for file, _ in dataset_class.train_list + dataset_class.test_list]
    how_to = (
        f"extract {dataset_class.filename} ({dataset_class.url}) into <root> so that "
        f"<root>/{dataset_class.base_folder}/ holds {', '.join(expected)}; ekd never downloads"
    )
    if root is None:
        raise DatasetNotFoundError(f"{name} needs root=<folder>: {how_to}")
    folder = Path(root) / dataset_class.base_folder
    missing = [file for file in expected if not (folder / file).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"{name} not found: {folder} lacks {', '.join(missing)}; {how_to.replace('<root>', str(root))}"
        )
    try:
        train_pool, test = (dataset_class(root, train=train, download=False) for train in (True, False))
    except RuntimeError as error:  # torchvision's md5 check of the batch files
        raise DatasetNotFoundError(
            f"{name} files under {folder} failed torchvision's checksum check; "
            f"{how_to.replace('<root>', str(root))}"
        ) from error
    pool = _cifar_tensors(train_pool, image_size)
    train, val = carving.split(np.arange(len(pool)), np.asarray(train_pool.targets))
    return _splits(
        name,
        _subset(pool, train),
        _subset(pool, val),
        _cifar_tensors(test, image_size),
        image_size,
        tuple(train_pool.classes),
    )


def _cifar_tensors(dataset: torchvision.datasets.CIFAR10, image_size: int) -> ImageTensorDataset:
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2)  # torchvision keeps CIFAR as uint8 NHWC
    return ImageTensorDataset(_resize(images, image_size), torch.as_tensor(dataset.targets))


# Where each layout keeps its splits: (training pool, test split); validation is carved from the pool.
_LAYOUTS = {"imagefolder": ("train", "test"), "imagenet": ("train", "val")}


def _load_image_folders(
    name: str,
    root: str | os.PathLike | None,
    image_size: int,
    carving: _PoolSplit,
    evaluation: CentreCrop,
    skip_unreadable: bool,
    normalization: tuple[tuple[float, ...], tuple[float, ...]],
) -> DatasetSplits:
    pool_split, test_split = _LAYOUTS[name]
    layout = (
        f"expected <root>/{pool_split}/<class>/<image> and <root>/{test_split}/<class>/<image> with the same "
        f"class folders (validation is carved from {pool_split})"
    )
    if root is None:
        raise DatasetNotFoundError(f"{name} needs root=<folder>: {layout}")
    missing = [
        str(Path(root) / split) for split in (pool_split, test_split) if not (Path(root) / split).is_dir()
    ]
    if missing:
        raise DatasetNotFoundError(f"{name}: missing {', '.join(missing)}; {layout}")
    try:
        classes, pool = list_image_folder(Path(root) / pool_split)
        test_classes, test = list_image_folder(Path(root) / test_split)
    except FileNotFoundError as error:  # a split without class folders, or without images
        raise DatasetNotFoundError(f"{name}: {error}; {layout}") from None
    if classes != test_classes:
        raise ConfigError(
            f"{name}: {pool_split} classes {classes} differ from {test_split} classes {test_classes} under "
            f"{root}; {layout}"
        )
    labels = np.asarray([label for _, label in pool])
    train, val = carving.split(np.arange(len(pool)), labels)
    mean, std = normalization
    return DatasetSplits(
        train=ImageFiles([pool[i] for i in train], skip_unreadable=skip_unreadable),
        val=ImageFiles([pool[i] for i in val], transform=evaluation, skip_unreadable=skip_unreadable),
        test=ImageFiles(test, transform=evaluation, skip_unreadable=skip_unreadable),
        num_classes=len(classes),
        in_chans=3,
        image_size=image_size,
        mean=mean,
        std=std,
        class_names=tuple(classes),
        name=name,
        decoded_on_access=True,
    )


def _load_fake(
    image_size: int, carving: _PoolSplit, test_fraction: float, fake_samples: int
) -> DatasetSplits:
    num_test = round(fake_samples * test_fraction)
    num_val = round((fake_samples - num_test) * carving.val_fraction)
    sizes = (fake_samples - num_test - num_val, num_val, num_test)
    if min(sizes[0], sizes[2]) < 1 or (num_val < 1 and carving.val_fraction > 0):
        raise ConfigError(
            f"fake_samples={fake_samples} leaves an empty split (train, val, test = {sizes}); "
            "use more samples"
        )
    # FakeData draws image k from torch.manual_seed(k + random_offset): disjoint offsets give disjoint splits,
    # and the seed shifts them all.
    offsets = np.cumsum((carving.seed * fake_samples,) + sizes[:-1])
    train, val, test = (
        _materialize(
            torchvision.datasets.FakeData(
                size=size,
                image_size=(3, image_size, image_size),
                num_classes=_FAKE_NUM_CLASSES,
                transform=v2.PILToTensor(),
                random_offset=int(offset),
            )
        )
        for size, offset in zip(sizes, offsets)
    )
    trained: SplitDataset = train
    if carving.train_fraction < 1:
        kept = limited_training_subset(
            np.arange(len(train)), train.labels.numpy(), carving.train_fraction, carving.subset_seed
        )
        trained = _subset(train, kept)
    return _splits("fake", trained, val, test, image_size, tuple(str(c) for c in range(_FAKE_NUM_CLASSES)))


def _materialize(dataset: torchvision.datasets.FakeData) -> ImageTensorDataset:
    if len(dataset) == 0:  # the validation split of `val_fraction: 0`
        empty = torch.empty((0, *dataset.image_size), dtype=torch.uint8)
        return ImageTensorDataset(empty, torch.empty(0, dtype=torch.int64))
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return ImageTensorDataset(torch.stack(images), torch.as_tensor(labels))


def _stratified_split(
    indices: np.ndarray, labels: np.ndarray, held_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held) index arrays: a seeded split that keeps each class's share in both parts."""
    classes = len(np.unique(labels))
    if round(len(indices) * held_fraction) < classes:
        raise ConfigError(
            f"holding out {held_fraction} of {len(indices)} samples leaves fewer samples than the {classes} "
            "classes a stratified split needs; raise the fraction"
        )
    kept, held = stratified_split(labels, held_fraction, seed)
    return np.sort(indices[kept]), np.sort(indices[held])


def _resize(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Bilinear (antialiased) resize of uint8 [N, C, H, W] to square `image_size`; a no-op at that size."""
    if images.shape[-2:] == (image_size, image_size):
        return images
    return torch.cat(
        [
            v2.functional.resize(
                chunk, [image_size, image_size], interpolation=InterpolationMode.BILINEAR, antialias=True
            )
            for chunk in images.split(_RESIZE_CHUNK)
        ]
    )


def _splits(
    name: str,
    train: SplitDataset,
    val: SplitDataset,
    test: SplitDataset,
    image_size: int,
    class_names: tuple[str, ...],
) -> DatasetSplits:
    mean, std = _channel_mean_std(train)
    return DatasetSplits(
        train=train,
        val=val,
        test=test,
        num_classes=len(class_names),
        in_chans=3,
        image_size=image_size,
        mean=mean,
        std=std,
        class_names=class_names,
        name=name,
    )


def _channel_mean_std(dataset: Dataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of a uint8 image dataset, in [0, 1] pixel units."""
    # Scalar zeros: the first batch's per-channel sums broadcast onto them.
    total = total_sq = torch.zeros((), dtype=torch.float64)
    count = 0
    for images, _ in DataLoader(dataset, batch_size=512):
        pixels = images.to(torch.float64) / 255.0
        total = total + pixels.sum(dim=(0, 2, 3))
        total_sq = total_sq + pixels.square().sum(dim=(0, 2, 3))
        count += pixels.numel() // pixels.shape[1]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0.0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def describe(splits: DatasetSplits) -> str:
    """One line: name, split sizes, classes, image shape."""
    return (
        f"{splits.name}: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test, "
        f"{splits.num_classes} classes, {splits.in_chans}x{splits.image_size}x{splits.image_size} uint8"
    )
