"""A small real image dataset in ImageFolder layout, written with PIL, for every suite (the `image_folder`
fixture of tests/conftest.py; the constants describe it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_CLASSES = ("n01440764", "n01443537", "n01484850", "n01491361")  # ImageNet-style folder names
TRAIN_PER_CLASS = 60
VAL_PER_CLASS = 15
TRUNCATED_FILE = Path("train") / IMAGE_CLASSES[1] / "truncated.JPEG"


def _class_image(rng: np.random.Generator, label: int, width: int, height: int) -> np.ndarray:
    """An RGB image whose class shows in its colour and stripe direction, with noise: learnable, not
    trivial."""
    base = np.zeros((height, width, 3), dtype=np.float32)
    base[..., label % 3] = 170.0
    stripes = np.sin(np.arange(width if label < 2 else height) * (0.3 + 0.2 * label)) * 50.0
    base += stripes[None, :, None] if label < 2 else stripes[:, None, None]
    base += rng.normal(0.0, 35.0, base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


def write_image_folder(root: Path, *, seed: int = 0) -> Path:
    """The `imagenet` layout (<root>/train/<class>/, <root>/val/<class>/) of 4 classes and 300 images of mixed
    sizes (40 to 120 pixels a side) and aspect ratios: JPEGs, plus one grayscale JPEG, one CMYK JPEG and one
    RGBA PNG per split, and one truncated JPEG in train (`TRUNCATED_FILE`)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for label, name in enumerate(IMAGE_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                width, height = (int(x) for x in rng.integers(40, 121, size=2))
                pixels = _class_image(rng, label, width, height)
                image = Image.fromarray(pixels)
                if k == 0 and label == 0:
                    image.convert("L").save(folder / f"{split}_{k}_gray.JPEG", quality=90)
                elif k == 1 and label == 0:
                    image.convert("CMYK").save(folder / f"{split}_{k}_cmyk.JPEG", quality=90)
                elif k == 2 and label == 0:
                    image.convert("RGBA").save(folder / f"{split}_{k}_alpha.png")
                else:
                    image.save(folder / f"{split}_{k}.JPEG", quality=90)
    whole = root / "train" / IMAGE_CLASSES[1] / "train_0.JPEG"
    (root / TRUNCATED_FILE).write_bytes(whole.read_bytes()[: len(whole.read_bytes()) // 2])
    return root
