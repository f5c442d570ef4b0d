"""Image files decoded on access: ImageFolder-layout datasets that never hold the dataset in memory.

Listing a split walks its folders once (torchvision's `find_classes` / `make_dataset`, the layout
torchvision's `ImageFolder` reads); nothing is decoded until a sample is asked for, in whichever DataLoader
worker asks. Every image becomes RGB as torchvision's default loader makes it (`PIL.Image.convert("RGB")`:
grayscale replicated, CMYK converted, alpha dropped). A file that cannot be decoded (truncated, not an
image) is an `UnreadableImageError` naming it, or, with `skip_unreadable`, a warning and a None item that
`views.collate_readable` drops and counts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from services.core.errors import UserError

logger = logging.getLogger(__name__)


class UnreadableImageError(UserError):
    """An image file that cannot be decoded; the message names the file and what to do."""


def list_image_folder(directory: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(path, class index)]) of `directory/<class>/<image>`, sorted as torchvision sorts."""
    classes, class_to_index = find_classes(str(directory))
    return classes, make_dataset(str(directory), class_to_index, extensions=IMG_EXTENSIONS)


class ImageFiles(Dataset):
    """(image, label) for each (path, label) in `samples`, decoded when asked for.

    The image is an RGB `PIL.Image` at the file's own size, or `transform(image)` when a transform is given
    (e.g. evaluation's centre crop, which makes a uint8 tensor); None when the file is unreadable and
    `skip_unreadable` is set.
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        *,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        skip_unreadable: bool = False,
    ) -> None:
        self.samples = samples
        self.transform = transform
        self.skip_unreadable = skip_unreadable

    def __len__(self) -> int:
        return len(self.samples)

    def with_transform(self, transform: Callable[[Image.Image], torch.Tensor]) -> ImageFiles:
        return ImageFiles(self.samples, transform=transform, skip_unreadable=self.skip_unreadable)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            with Image.open(path) as file:
                image = file.convert("RGB")  # decodes the whole file: a truncated one fails here
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            if not self.skip_unreadable:
                raise UnreadableImageError(
                    f"cannot read image {path}: {error}; replace or remove the file, or set "
                    "data.skip_unreadable: true to skip such files (they are counted)"
                ) from error
            logger.warning("skipping unreadable image %s: %s", path, error)
            return None, label
        return (self.transform(image) if self.transform is not None else image), label
