"""Replayed ImageNet views on real image files: the crop box as torchvision draws it, the same bytes in any
process and with any number of DataLoader workers, evaluation's centre crop, and files that cannot be read."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from image_folders import IMAGE_CLASSES, TRAIN_PER_CLASS, TRUNCATED_FILE, VAL_PER_CLASS
from PIL import Image
from torchvision.transforms import v2

from trainer.data import (
    CentreCrop,
    ImageFiles,
    RandomResizedCrop,
    ReplayedViews,
    UnreadableImageError,
    collate_readable,
    load_dataset,
)
from trainer.data.images import list_image_folder
from trainer.runs.loop import LoaderSettings, readable_batches, train_loader

REPO_ROOT = Path(__file__).resolve().parents[2]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def splits(root: Path, image_size: int = 32):
    return load_dataset(
        "imagenet",
        root=root,
        image_size=image_size,
        seed=0,
        val_fraction=0.1,
        mean=MEAN,
        std=STD,
        skip_unreadable=True,
    )


def test_imagenet_layout_lists_every_file_without_decoding_any(image_folder):
    data = splits(image_folder)
    pool = len(IMAGE_CLASSES) * TRAIN_PER_CLASS + 1  # + the truncated file
    assert len(data.train) + len(data.val) == pool and len(data.test) == len(IMAGE_CLASSES) * VAL_PER_CLASS
    assert data.class_names == IMAGE_CLASSES and data.decoded_on_access


def test_crop_box_follows_torchvisions_random_resized_crop():
    crop = RandomResizedCrop(32, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    for seed in range(300):
        generator = np.random.default_rng(seed)
        width, height = (int(x) for x in generator.integers(20, 400, size=2))
        left, top, w, h = crop.box(width, height, generator)
        assert left >= 0 and left + w <= width and top >= 0 and top + h <= height
        in_ratio = width / height
        if 0.08 * 0.9 <= w * h / (width * height) <= 1.0 and 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1:
            continue
        # Otherwise the fallback: the whole image clamped to the allowed ratios, centred.
        assert (w == width or h == height) and (
            in_ratio < 3 / 4 or in_ratio > 4 / 3 or (w, h) == (width, height)
        )


def test_view_bytes_recur_per_view_and_differ_between_views(image_folder):
    views = ReplayedViews(splits(image_folder).train, seed=5, views=3, maker=RandomResizedCrop(32))
    first, again, other = views.view(7, 1), views.view(7, 1), views.view(7, 2)
    assert first.dtype == torch.uint8 and first.shape == (3, 32, 32)
    assert torch.equal(first, again) and not torch.equal(first, other)
    views.set_epoch(4)  # epoch 4 of 3 views is view 1 again
    image, _, index, view = views[7]
    assert (index, view) == (7, 1) and torch.equal(image, first)


def digests(loader) -> dict[int, str]:
    """sha256 of each sample's view bytes, by sample index."""
    seen = {}
    for (images, _, indices, _), _skipped in readable_batches(loader):
        for image, index in zip(images, indices.tolist(), strict=True):
            seen[index] = hashlib.sha256(image.numpy().tobytes()).hexdigest()
    return seen


@pytest.mark.slow  # loader worker processes and a Python process of its own: 7-11 s here
def test_the_same_bytes_with_any_number_of_workers_and_in_another_process(image_folder):
    views = ReplayedViews(splits(image_folder).train, seed=11, views=4, maker=RandomResizedCrop(24))
    in_process = digests(train_loader(views, 32, seed=0, epoch=2))
    with_workers = digests(train_loader(views, 32, seed=0, epoch=2, loading=LoaderSettings(workers=2)))
    assert in_process == with_workers and len(in_process) == len(views) - 1  # the truncated file is skipped
    script = (
        "import hashlib, sys\n"
        "from trainer.data import RandomResizedCrop, ReplayedViews, load_dataset\n"
        "data = load_dataset('imagenet', root=sys.argv[1], image_size=24, seed=0, val_fraction=0.1,\n"
        "                    mean=(0.5,) * 3, std=(0.5,) * 3, skip_unreadable=True)\n"
        "views = ReplayedViews(data.train, seed=11, views=4, maker=RandomResizedCrop(24))\n"
        "for index in (0, 100, 200):\n"
        "    print(index, hashlib.sha256(views.view(index, 2).numpy().tobytes()).hexdigest())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(image_folder)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
        env={"PYTHONHASHSEED": "4242", "PATH": ""},
    )
    other = dict(line.split() for line in result.stdout.splitlines())
    assert {int(k): v for k, v in other.items()} == {i: in_process[i] for i in (0, 100, 200)}


def test_centre_crop_is_timms_evaluation_transform(image_folder):
    reference = v2.Compose([v2.Resize(math.floor(32 / 0.875)), v2.CenterCrop(32), v2.PILToTensor()])
    for path, _ in list_image_folder(image_folder / "val")[1][:20]:
        with Image.open(path) as file:
            image = file.convert("RGB")
        assert torch.equal(CentreCrop(32, 0.875)(image), reference(image))


def test_grayscale_cmyk_and_png_files_become_three_channel_views(image_folder):
    _, samples = list_image_folder(image_folder / "train")
    odd = [(path, label) for path, label in samples if path.endswith(("_gray.JPEG", "_cmyk.JPEG", ".png"))]
    assert len(odd) == 3
    files = ImageFiles(odd, transform=CentreCrop(16))
    for index in range(len(files)):
        image, label = files[index]
        assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and label == 0
    gray, _ = files[[i for i, (path, _) in enumerate(odd) if path.endswith("_gray.JPEG")][0]]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_an_unreadable_file_is_named_or_skipped_and_counted(image_folder):
    broken = [(str(image_folder / TRUNCATED_FILE), 1)]
    with pytest.raises(UnreadableImageError, match=r"cannot read image .*truncated\.JPEG.*skip_unreadable"):
        ImageFiles(broken)[0]
    _, samples = list_image_folder(image_folder / "train")
    files = ImageFiles(samples[:3] + broken, skip_unreadable=True)
    views = ReplayedViews(files, seed=0, views=1, maker=RandomResizedCrop(16))
    images, labels, indices, view_numbers, skipped = collate_readable([views[i] for i in range(4)])
    assert images.shape == (3, 3, 16, 16) and indices.tolist() == [0, 1, 2] and int(skipped) == 1
    assert collate_readable([views[3]]) is None
