"""Replayed views: the augmented view of sample i at epoch e is a pure function of (seed, i, e mod V).

This follows FKD (Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition", ECCV 2022):
the same V views recur byte for byte, in any process and with any number of DataLoader workers, so their
teacher outputs are computed once and then read from the content-keyed cache. Teacher and student see the
same view (the "consistent teacher" of Beyer et al., "Knowledge distillation: A good teacher is patient and
consistent", CVPR 2022).

Two view makers:
- `PadCrop`: CIFAR's recipe on in-memory uint8 images already at the training size: a random crop of the
  image zero-padded by `pad` pixels, then an optional horizontal flip.
- `RandomResizedCrop`: ImageNet's recipe on a decoded image of any size: a box of random area (`scale`) and
  aspect ratio (`ratio`), drawn as torchvision's `RandomResizedCrop.get_params` draws it (ten tries, then the
  centre crop), resized to `image_size`, then an optional flip. The box depends only on (seed, i, v) and the
  image's size; the crop, resize and flip are torchvision's functional ones on the PIL image, the operations
  torchvision's `RandomResizedCrop` and `RandomHorizontalFlip` apply.

`CentreCrop` is evaluation's transform (timm's and torchvision's convention): resize the shorter side to
`image_size / crop_pct`, then crop the centre `image_size` square.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

Interpolation = Literal["bilinear", "bicubic"]
_INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}
_RRC_TRIES = 10  # torchvision's


def view_seed(seed: int, index: int, view: int) -> np.random.SeedSequence:
    """The randomness of view `view` of sample `index`: a `SeedSequence` hash of the three numbers, never
    Python's per-process salted `hash`, so every process draws the same."""
    return np.random.SeedSequence([seed, index, view])


@dataclass(frozen=True)
class PadCrop:
    """A random crop of the zero-padded in-memory image, then an optional flip (the CIFAR recipe)."""

    pad: int
    hflip: bool

    def __post_init__(self) -> None:
        if not isinstance(self.pad, int) or self.pad < 0:
            raise ValueError(f"pad must be a non-negative int, got {self.pad!r}")

    @property
    def augments(self) -> bool:
        return self.pad > 0 or self.hflip

    def __call__(self, image: torch.Tensor, seed: np.random.SeedSequence) -> torch.Tensor:
        # Drawn with torch from the sequence's first word, as ekd always has: the bytes stay those of earlier
        # releases, so their cached teacher outputs stay valid.
        torch_generator = torch.Generator().manual_seed(int(seed.generate_state(1, dtype=np.uint64)[0]))
        channels, height, width = image.shape
        padded = image.new_zeros(channels, height + 2 * self.pad, width + 2 * self.pad)
        padded[:, self.pad : self.pad + height, self.pad : self.pad + width] = image
        top, left = torch.randint(0, 2 * self.pad + 1, (2,), generator=torch_generator).tolist()
        crop = padded[:, top : top + height, left : left + width]
        if self.hflip and torch.randint(0, 2, (1,), generator=torch_generator).item() == 1:
            crop = crop.flip(-1)
        return crop.contiguous()


@dataclass(frozen=True)
class RandomResizedCrop:
    """ImageNet's training view of a PIL image: a random box resized to `image_size`, then a flip."""

    image_size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    interpolation: Interpolation = "bilinear"

    augments = True

    def box(self, width: int, height: int, generator: np.random.Generator) -> tuple[int, int, int, int]:
        """(left, top, crop width, crop height): torchvision's `RandomResizedCrop.get_params`, drawn from
        `generator`."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(_RRC_TRIES):
            target_area = area * generator.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(generator.uniform(log_ratio[0], log_ratio[1]))
            crop_width = round(math.sqrt(target_area * aspect))
            crop_height = round(math.sqrt(target_area / aspect))
            if 0 < crop_width <= width and 0 < crop_height <= height:
                top = int(generator.integers(0, height - crop_height + 1))
                left = int(generator.integers(0, width - crop_width + 1))
                return left, top, crop_width, crop_height
        # Fallback: the whole image cropped to the nearest allowed aspect ratio, centred.
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            crop_width, crop_height = width, round(width / min(self.ratio))
        elif in_ratio > max(self.ratio):
            crop_width, crop_height = round(height * max(self.ratio)), height
        else:
            crop_width, crop_height = width, height
        return (width - crop_width) // 2, (height - crop_height) // 2, crop_width, crop_height

    def __call__(self, image: Image.Image, seed: np.random.SeedSequence) -> torch.Tensor:
        generator = np.random.default_rng(seed)
        left, top, crop_width, crop_height = self.box(image.width, image.height, generator)
        flip = self.hflip and generator.integers(0, 2) == 1
        size = [self.image_size, self.image_size]
        view = F.resized_crop(
            image, top, left, crop_height, crop_width, size, _INTERPOLATION[self.interpolation]
        )
        if flip:
            view = F.horizontal_flip(view)
        return F.pil_to_tensor(view)


@dataclass(frozen=True)
class CentreCrop:
    """Evaluation's view of a PIL image: shorter side resized to `image_size / crop_pct`, centre crop."""

    image_size: int
    crop_pct: float = 0.875
    interpolation: Interpolation = "bilinear"

    def __call__(self, image: Image.Image) -> torch.Tensor:
        # timm's eval transform: Resize(floor(size / crop_pct)) of the shorter side, then CenterCrop(size).
        resized = F.resize(
            image, math.floor(self.image_size / self.crop_pct), _INTERPOLATION[self.interpolation]
        )
        return F.pil_to_tensor(F.center_crop(resized, [self.image_size, self.image_size]))


ViewMaker = PadCrop | RandomResizedCrop


class LabelledImages(Protocol):
    """What views are replayed from: a split of (image, label) samples with a length (torch's Dataset
    declares none), the image None where an unreadable file is skipped."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> Any: ...


class ReplayedViews(Dataset):
    """A train split whose augmented views replay exactly: view v of sample i depends only on (seed, i, v).

    At epoch e the view index is v = e mod `views`, so epochs e and e + `views` see identical bytes. With
    `views=0`, or a maker that does not augment, every view is the image itself and v = 0 (in-memory images
    only: a decoded file needs a maker to reach the training size).

    Items are (view uint8 [C, H, W], label, i, v), or None for an unreadable file the dataset skips (see
    `collate_readable`). DataLoader workers copy the dataset when an iterator starts, so call `set_epoch`
    before iterating each epoch (and do not use `persistent_workers`).
    """

    def __init__(self, dataset: LabelledImages, *, seed: int, views: int, maker: ViewMaker) -> None:
        for label, value in (("seed", seed), ("views", views)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{label} must be a non-negative int, got {value!r}")
        self.dataset = dataset
        self.seed = seed
        self.views = views
        self.maker = maker
        self.augments = views > 0 and maker.augments
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch = epoch

    def view_index(self, epoch: int) -> int:
        """The view every sample shows at `epoch`."""
        return epoch % self.views if self.augments else 0

    def view(self, index: int, view: int) -> torch.Tensor | None:
        """View `view` of sample `index`: uint8 [C, H, W], contiguous (None: an unreadable file skipped)."""
        image, _ = self.dataset[index]
        return None if image is None else self._make(image, index, view)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, int] | None:
        image, label = self.dataset[index]
        if image is None:
            return None
        view = self.view_index(self.epoch)
        return self._make(image, index, view), label, index, view

    def _make(self, image, index: int, view: int) -> torch.Tensor:
        if not self.augments:
            return image.contiguous()
        return self.maker(image, view_seed(self.seed, index, view))


def collate_readable(items: list) -> tuple | None:
    """`default_collate` of the items that are not None, with the number skipped appended as an int64
    tensor (so it survives pinning and worker processes); None when every item was skipped."""
    kept = [item for item in items if item is not None]
    if not kept:
        return None
    return (*default_collate(kept), torch.tensor(len(items) - len(kept)))
