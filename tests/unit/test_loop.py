"""The epoch loop's data: seeded orders, shards, and no batch of one (BatchNorm cannot train on it)."""

import torch

from trainer.data import ImageTensorDataset, PadCrop, ReplayedViews
from trainer.runs.loop import Shard, train_loader


def views(size: int) -> ReplayedViews:
    images = torch.randint(
        0, 256, (size, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    return ReplayedViews(
        ImageTensorDataset(images, torch.arange(size) % 10), seed=0, views=2, maker=PadCrop(1, False)
    )


def test_a_last_batch_of_one_sample_is_dropped_and_no_other():
    assert [len(b[1]) for b in train_loader(views(9), 4, seed=0, epoch=0)] == [4, 4]
    assert [len(b[1]) for b in train_loader(views(10), 4, seed=0, epoch=0)] == [4, 4, 2]


def test_shards_take_equal_steps_and_drop_a_last_batch_of_one_together():
    # 10 samples, 2 workers: 5 each; batches of ceil(4 / 2) = 2 -> 2, 2, and a last single sample dropped.
    steps = [
        [len(b[1]) for b in train_loader(views(10), 4, seed=0, epoch=0, shard=Shard(rank, 2))]
        for rank in range(2)
    ]
    assert steps == [[2, 2], [2, 2]]


def test_epoch_order_is_seeded_and_differs_between_epochs():
    first = [b[2].tolist() for b in train_loader(views(10), 4, seed=0, epoch=0)]
    assert first == [b[2].tolist() for b in train_loader(views(10), 4, seed=0, epoch=0)]
    assert first != [b[2].tolist() for b in train_loader(views(10), 4, seed=0, epoch=1)]
