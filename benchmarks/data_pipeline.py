"""Data pipeline: ekd's replayed ImageNet views ÷ torchvision's ImageFolder + RandomResizedCrop + flip,
on the same JPEG files and worker counts; and peak memory against the dataset's size.

(a) torchvision, the baseline a user would pick: `ImageFolder(root, transform=Compose([RandomResizedCrop(S),
    RandomHorizontalFlip(), PILToTensor()]))` in a DataLoader (shuffled, batch B, W workers);
(b) ekd: `load_dataset("imagefolder", ...)` (files listed, decoded on access) + `ReplayedViews` with
    `RandomResizedCrop(S)` (the crop box a pure function of (seed, i, v) and the image size) through
    `trainer.runs.loop.train_loader` (B, W workers), the loader training uses.

Both decode the same JPEGs with PIL and crop, resize and flip with torchvision's functional ops: the ratio
(b) ÷ (a) is what replay costs (goal ≥ 0.95). Each figure is the fastest of interleaved rounds of one epoch
each (benchmarks/_timing.py). Peak memory: a fresh process per run iterates one epoch of (b) with 0 workers
over the dataset and over the dataset listed 4 times (the same files under 4× as many names), and reports its
peak RSS; a pipeline that held or passed over the dataset would grow with it.

Run: .venv/bin/python benchmarks/data_pipeline.py [--images 400] [--image-size 224] [--workers 0 2]
                                                  [--rounds 3] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from _timing import interleaved_rates  # benchmarks/ is the script's folder, first on sys.path
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from trainer.data import RandomResizedCrop, ReplayedViews, load_dataset
from trainer.runs.loop import LoaderSettings, train_loader

CLASSES = 8
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def write_jpegs(root: Path, images: int, copies: int = 1) -> None:
    """`images` JPEGs of ImageNet-like sizes (shorter side 300-500, aspect 3:4 to 16:9) under <root>/train and
    <root>/test, class folders; with `copies` > 1 each file is listed that many times (hard links)."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for k in range(images if split == "train" else CLASSES):
            folder = root / split / f"class{k % CLASSES}"
            folder.mkdir(parents=True, exist_ok=True)
            short = int(rng.integers(300, 501))
            long = int(short * rng.uniform(4 / 3, 16 / 9))
            size = (long, short) if k % 2 else (short, long)
            pixels = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
            image = Image.fromarray(pixels).resize(
                size, Image.Resampling.BICUBIC
            )  # smooth, JPEG-like content
            path = folder / f"{k}.JPEG"
            image.save(path, quality=90)
            for copy in range(1, copies):
                os.link(path, folder / f"{k}_copy{copy}.JPEG")


def torchvision_loader(root: Path, image_size: int, batch_size: int, workers: int) -> DataLoader:
    transform = v2.Compose([v2.RandomResizedCrop(image_size), v2.RandomHorizontalFlip(), v2.PILToTensor()])
    dataset = ImageFolder(str(root / "train"), transform=transform)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)


def ekd_views(root: Path, image_size: int) -> ReplayedViews:
    splits = load_dataset(
        "imagefolder", root=root, image_size=image_size, seed=0, val_fraction=0.1, mean=MEAN, std=STD
    )
    return ReplayedViews(splits.train, seed=0, views=8, maker=RandomResizedCrop(image_size))


def epoch_of(loader_for_epoch) -> callable:
    """Work for `interleaved_rates`: one epoch, returning the images it produced."""
    epoch = [0]

    def run() -> int:
        epoch[0] += 1
        count = 0
        for batch in loader_for_epoch(epoch[0]):
            count += batch[0].shape[0]
        return count

    return run


PEAK_MEMORY_RUN = """
import json, resource, sys
sys.path.insert(0, sys.argv[3])
from data_pipeline import ekd_views
from trainer.runs.loop import train_loader
from pathlib import Path
views = ekd_views(Path(sys.argv[1]), int(sys.argv[2]))
count = sum(batch[0].shape[0] for batch in train_loader(views, 32, seed=0, epoch=0))
print(json.dumps({"images": count, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def peak_memory(root: Path, image_size: int) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY_RUN, str(root), str(image_size), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        root, bigger = Path(tmp) / "once", Path(tmp) / "four_times"
        write_jpegs(root, args.images)
        write_jpegs(bigger, args.images, copies=4)
        views = ekd_views(root, args.image_size)
        table = Table(title=f"replayed views vs torchvision, {args.images} JPEGs, {args.image_size}² views")
        for column in ("workers", "(a) torchvision images/s", "(b) ekd images/s", "(b) ÷ (a)", "per worker"):
            table.add_column(column, justify="right")
        for workers in args.workers:
            loading = LoaderSettings(workers=workers)
            baseline = torchvision_loader(root, args.image_size, args.batch_size, workers)
            rates = interleaved_rates(
                {
                    "torchvision": epoch_of(lambda epoch: baseline),
                    "ekd": epoch_of(
                        lambda epoch: train_loader(views, args.batch_size, 0, epoch, loading=loading)
                    ),
                },
                seconds=0.0,  # one epoch per round: the window closes after the first call
                rounds=args.rounds,
            )
            per_worker = rates["ekd"] / max(workers, 1)
            table.add_row(
                str(workers),
                f"{rates['torchvision']:,.0f}",
                f"{rates['ekd']:,.0f}",
                f"{rates['ekd'] / rates['torchvision']:.2f}",
                f"{per_worker:,.0f}",
            )
        console.print(table)
        once, four = peak_memory(root, args.image_size), peak_memory(bigger, args.image_size)
        memory = Table(title="peak memory of one epoch (0 workers), against the dataset's size")
        for column in ("dataset", "images", "peak RSS (MB)"):
            memory.add_column(column, justify="right")
        memory.add_row("listed once", str(once["images"]), f"{once['peak_rss_mb']:.0f}")
        memory.add_row("listed 4 times", str(four["images"]), f"{four['peak_rss_mb']:.0f}")
        growth = four["peak_rss_mb"] / once["peak_rss_mb"]
        memory.add_row("ratio", f"{four['images'] / once['images']:.1f}", f"{growth:.2f}")
        console.print(memory)


if __name__ == "__main__":
    main()
