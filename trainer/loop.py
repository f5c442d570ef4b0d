"""Training and evaluation steps and epochs, in plain PyTorch (the Ray Train adapter wraps these).

Data-parallel training (one process per worker, a torch.distributed process group between them) shards each
epoch's batches with `Shard` and averages each epoch's statistics with `all_reduce_epoch_stats`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import distributed, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from services.errors import ConfigError
from trainer.config import OptimConfig
from trainer.data import ReplayedViews, normalize
from trainer.methods.base import Method, TrainingClock
from trainer.prefetch import prepared_batches
from trainer.sources import TeacherSource


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(device)


def make_optimizer(param_groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            param_groups,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )
    return torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """Per-step schedule, so that short runs on small data follow the same curve as long ones."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
        )
    if cfg.schedule == "multistep":
        steps = [int(m * total_steps) for m in cfg.milestones]
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: cfg.gamma ** sum(step >= s for s in steps)
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


@dataclass(frozen=True)
class Shard:
    """This worker's place among `world_size` data-parallel workers."""

    rank: int
    world_size: int

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"a shard needs world_size >= 1 and 0 <= rank < world_size, "
                f"got rank {self.rank} of {self.world_size}"
            )


class ShardSampler(Sampler[int]):
    """Worker `shard.rank`'s share of one seeded permutation: positions rank, rank + W, rank + 2W, ...

    Every worker draws the same permutation from the same seed, so the shards are disjoint and together cover
    every sample. The permutation is padded by wrapping around to a multiple of W, as torch's
    DistributedSampler does, so that all workers take the same number of steps (DDP needs each step on every
    worker). With per-worker batches of B / W (W dividing B), step k of the W workers together sees exactly
    the permutation's k-th batch of B: the batches a single process would see.
    """

    def __init__(self, size: int, shard: Shard, generator: torch.Generator) -> None:
        self.size = size
        self.shard = shard
        self.generator = generator

    def __len__(self) -> int:
        return -(-self.size // self.shard.world_size)

    def __iter__(self):
        order = torch.randperm(self.size, generator=self.generator)  # what shuffle=True draws
        total = len(self) * self.shard.world_size
        padded = order.repeat(-(-total // self.size))[:total]
        return iter(padded[self.shard.rank :: self.shard.world_size].tolist())


def train_loader(
    views: ReplayedViews, batch_size: int, seed: int, epoch: int, shard: Shard | None = None
) -> DataLoader:
    """The epoch's batches: the replayed view of each sample for this epoch, in a seeded order.

    With a `shard`, this worker's part of the same order (`ShardSampler`) in batches of
    ceil(batch_size / world_size), so that a step of all workers together covers about one batch of
    `batch_size` (exactly when world_size divides it).

    A last batch of a single sample is dropped: BatchNorm in training mode (ONE's gate, every student's BN)
    cannot normalize one value per channel.
    """
    views.set_epoch(epoch)
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if shard is None:
        return DataLoader(
            views,
            batch_size=batch_size,
            shuffle=True,
            generator=generator,
            drop_last=len(views) % batch_size == 1,
        )
    per_worker_batch = -(-batch_size // shard.world_size)
    sampler = ShardSampler(len(views), shard, generator)
    # The loader draws its workers' base seed from `generator` before the sampler's permutation, as with
    # shuffle=True: the same generator in both places keeps every worker on the single-process permutation.
    return DataLoader(
        views,
        batch_size=per_worker_batch,
        sampler=sampler,
        generator=generator,
        drop_last=len(sampler) % per_worker_batch == 1,
    )


EVAL_BATCH_SIZE = 256  # evaluation holds no gradients: larger batches than training fit


def eval_loader(dataset: Dataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


@dataclass
class EpochStats:
    loss: float = 0.0
    terms: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    seconds: float = 0.0
    stall_seconds: float = 0.0  # time the student waited for teacher outputs


def train_epoch(
    method: Method,
    loader: Iterable,
    source: TeacherSource | None,
    optimizer: torch.optim.Optimizer,
    scheduler,
    *,
    epoch: int,
    total_epochs: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    on_step: Callable[[dict[str, float]], None] | None = None,
    step_module: nn.Module | None = None,
    prefetch_batches: int = 0,
) -> EpochStats:
    """One epoch over `loader`. `step_module` is what computes the loss: the method itself, or a
    DistributedDataParallel wrapper of it (Ray Train), which all-reduces gradients during backward.
    Teacher outputs are fetched `prefetch_batches` batches ahead (trainer.prefetch)."""
    step_module = step_module or method
    method.train()
    wanted = method.teacher_outputs()
    stats = EpochStats()
    batches = len(loader)  # type: ignore[arg-type]
    start = time.perf_counter()
    for step, batch in enumerate(prepared_batches(loader, source, wanted, prefetch_batches)):
        images, labels = batch.images, batch.labels
        teacher_outputs = batch.teachers.to(device) if batch.teachers is not None else None
        stats.stall_seconds += batch.stall_seconds
        inputs = normalize(images, mean, std).to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        clock = TrainingClock(epoch=epoch + step / batches, total_epochs=total_epochs)
        result = step_module(inputs, labels, teacher_outputs, clock)
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        optimizer.step()
        scheduler.step()
        n = labels.shape[0]
        stats.samples += n
        stats.loss += result.loss.item() * n
        for k, v in result.terms.items():
            stats.terms[k] = stats.terms.get(k, 0.0) + v * n
        if on_step is not None:
            on_step({"loss": result.loss.item(), **result.terms})
    stats.seconds = time.perf_counter() - start
    stats.loss /= max(stats.samples, 1)
    stats.terms = {k: v / max(stats.samples, 1) for k, v in stats.terms.items()}
    return stats


def all_reduce_epoch_stats(stats: EpochStats) -> EpochStats:
    """The epoch's statistics over all workers of the process group: loss and terms averaged per sample,
    samples summed, seconds and stall seconds averaged per worker. Every worker must call it."""
    names = sorted(stats.terms)
    sums = torch.tensor(
        [
            stats.loss * stats.samples,
            *(stats.terms[k] * stats.samples for k in names),
            stats.samples,
            stats.seconds,
            stats.stall_seconds,
        ],
        dtype=torch.float64,
    )
    distributed.all_reduce(sums)
    *weighted, samples, seconds, stall = sums.tolist()
    workers = distributed.get_world_size()
    per_sample = [w / max(samples, 1) for w in weighted]
    return EpochStats(
        loss=per_sample[0],
        terms=dict(zip(names, per_sample[1:])),
        samples=int(samples),
        seconds=seconds / workers,
        stall_seconds=stall / workers,
    )


def all_reduce_counts(counts: dict[str, int]) -> dict[str, int]:
    """Counts summed over all workers of the process group (every worker must call it, with the same keys)."""
    names = sorted(counts)
    totals = torch.tensor([counts[k] for k in names], dtype=torch.int64)
    distributed.all_reduce(totals)
    return dict(zip(names, totals.tolist()))


@torch.no_grad()
def evaluate(
    predict: Callable[[torch.Tensor], torch.Tensor],
    model: nn.Module,
    loader: Iterable,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
) -> float:
    """Top-1 accuracy of `predict` (scores whose argmax is the prediction) over uint8 batches."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for images, labels, *_ in loader:
        scores = predict(normalize(images, mean, std).to(device))
        correct += (scores.argmax(1).cpu() == labels).sum().item()
        total += labels.shape[0]
    model.train(was_training)
    return correct / max(total, 1)
