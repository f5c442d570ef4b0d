"""Training and evaluation steps and epochs, in plain PyTorch (the Ray Train adapter wraps these).

Data-parallel training (one process per worker, a torch.distributed process group between them) shards each
epoch's batches with `Shard` and averages each epoch's statistics with `all_reduce_epoch_stats`.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import multiprocessing.context
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import distributed, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from services.core.errors import ConfigError
from trainer.config import OptimConfig
from trainer.data import ReplayedViews, collate_readable, normalize
from trainer.methods.base import LossResult, Method, TrainingClock, in_soft_label_form
from trainer.runs.prefetch import PreparedBatch, prepared_batches
from trainer.runs.sources import TeacherSource


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


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, warmup_steps: int = 0
):
    """Per-step schedule, so that short runs on small data follow the same curve as long ones: a linear
    warm-up over `warmup_steps` (from lr / warmup_steps to lr), then the configured schedule over the rest."""
    warmup_steps = min(warmup_steps, total_steps - 1)
    steps = max(total_steps - warmup_steps, 1)
    if cfg.schedule == "cosine":

        def after_warmup(step: int) -> float:
            return 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))

    elif cfg.schedule == "multistep":
        boundaries = [int(m * steps) for m in cfg.milestones]

        def after_warmup(step: int) -> float:
            return cfg.gamma ** sum(step >= b for b in boundaries)

    else:

        def after_warmup(step: int) -> float:
            return 1.0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return after_warmup(step - warmup_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass(frozen=True)
class StepSettings:
    """How each training step runs: autocast dtype (None: fp32), memory format, gradient accumulation."""

    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False
    accumulate_steps: int = 1

    @classmethod
    def resolve(cls, cfg: OptimConfig, device: torch.device) -> StepSettings:
        """`precision: auto` is bf16 autocast on a CUDA device that supports it, fp32 elsewhere;
        `channels_last: null` is channels_last on CUDA (where convolutions run faster in it)."""
        on_cuda = device.type == "cuda"
        if cfg.precision == "auto":
            bf16 = on_cuda and torch.cuda.is_bf16_supported()
        else:
            bf16 = cfg.precision == "bf16"
        channels_last = on_cuda if cfg.channels_last is None else cfg.channels_last
        return cls(torch.bfloat16 if bf16 else None, channels_last, cfg.accumulate_steps)


def loader_worker_context() -> multiprocessing.context.BaseContext:
    """Where DataLoader workers start: forkserver, not fork. The training process runs threads (prefetch,
    gRPC, Ray's), and a child forked while one of them holds a lock deadlocks; forkserver's children fork
    from a thread-free server instead. The server imports torch and the datasets once, so that a loader's
    workers (started anew each epoch) do not each import them again."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", "torch", "trainer.data"])
    return context


@dataclass(frozen=True)
class LoaderSettings:
    """DataLoader settings shared by training and evaluation."""

    workers: int = 0  # decoding processes; 0: in the training process
    pin_memory: bool = False  # page-locked batches, so copies to the GPU can overlap compute
    prefetch_factor: int = 2  # batches each worker prepares ahead

    def kwargs(self) -> dict:
        extra = (
            {"prefetch_factor": self.prefetch_factor, "multiprocessing_context": loader_worker_context()}
            if self.workers > 0
            else {}
        )
        return {
            "num_workers": self.workers,
            "pin_memory": self.pin_memory,
            "collate_fn": collate_readable,
            **extra,
        }


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
    views: ReplayedViews,
    batch_size: int,
    seed: int,
    epoch: int,
    shard: Shard | None = None,
    loading: LoaderSettings = LoaderSettings(),
) -> DataLoader:
    """The epoch's batches: the replayed view of each sample for this epoch, in a seeded order.

    With a `shard`, this worker's part of the same order (`ShardSampler`) in batches of
    ceil(batch_size / world_size), so that a step of all workers together covers about one batch of
    `batch_size` (exactly when world_size divides it).

    A last batch of a single sample is dropped: BatchNorm in training mode (ONE's gate, every student's BN)
    cannot normalize one value per channel.

    Batches are (views, labels, indices, view numbers, unreadable files skipped), or None when every file of
    a batch was skipped (`collate_readable`).
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
            **loading.kwargs(),
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
        **loading.kwargs(),
    )


def resolved_epochs(cfg: OptimConfig, batches_per_epoch: int) -> int:
    """Epochs to train: `cfg.epochs`, or with `cfg.steps` the fewest whole epochs that make that many
    optimizer steps (the last epoch's steps are counted whole, so a run may make up to one epoch's more)."""
    if cfg.steps is None:
        return cfg.epochs
    optimizer_steps = -(-batches_per_epoch // cfg.accumulate_steps)
    return max(1, -(-cfg.steps // optimizer_steps))


EVAL_BATCH_SIZE = 256  # evaluation holds no gradients: larger batches than training fit


def eval_loader(dataset: Dataset, batch_size: int, loading: LoaderSettings = LoaderSettings()) -> DataLoader:
    """Batches of (images, labels, ..., unreadable files skipped) in dataset order, None where all were
    skipped."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **loading.kwargs())


def readable_batches(loader: Iterable) -> Iterator[tuple[tuple, int]]:
    """(batch without its skip count, unreadable files skipped) for each batch of a loader built here."""
    for batch in loader:
        if batch is None:  # every file of the batch was skipped; the loader knows not how many
            continue
        *kept, skipped = batch
        yield tuple(kept), int(skipped)


@dataclass
class EpochStats:
    loss: float = 0.0
    terms: dict[str, float] = field(default_factory=dict)
    train_accuracy: float = 0.0  # of the method's prediction on the training batches, as they trained
    samples: int = 0
    seconds: float = 0.0
    stall_seconds: float = 0.0  # time the student waited for teacher outputs
    skipped_images: int = 0  # unreadable files skipped (data.skip_unreadable)
    optimizer_steps: int = 0


@dataclass
class StudentTraining:
    """What trains a student, the same every epoch: the method (and `step_module`, what computes its loss:
    the method itself, or a DistributedDataParallel wrapper of it that all-reduces gradients during backward),
    its optimizer and schedule, the device, the data's normalisation, the step settings, and the form
    (`soft_labels`: "full" or "compact") the teachers' logits reach the method in."""

    method: Method
    optimizer: torch.optim.Optimizer
    scheduler: Any
    device: torch.device
    mean: Sequence[float]
    std: Sequence[float]
    settings: StepSettings = StepSettings()
    step_module: nn.Module | None = None
    soft_labels: str = "full"


class _EpochSums:
    """The epoch's loss, loss terms and correct predictions summed over samples on the training device, read
    once at the end: a read is a host sync, which would stall the device at every step."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device)
        self.terms: dict[str, torch.Tensor] = {}

    def add(self, result: LossResult, labels: torch.Tensor) -> None:
        samples = labels.shape[0]
        self.loss += result.loss.detach().float() * samples
        self.correct += (result.scores.argmax(1) == labels).sum()
        for name, value in result.terms.items():
            weighted = value.detach().float() * samples
            self.terms[name] = self.terms[name] + weighted if name in self.terms else weighted

    def per_sample(self, samples: int) -> tuple[float, float, dict[str, float]]:
        """(loss, accuracy, terms) per sample."""
        names = list(self.terms)
        device = self.loss.device
        values = torch.stack([self.loss, self.correct, *(self.terms[name].to(device) for name in names)])
        loss, accuracy, *terms = (values / max(samples, 1)).tolist()
        return loss, accuracy, dict(zip(names, terms, strict=True))


def train_epoch(
    training: StudentTraining,
    loader: Iterable,
    source: TeacherSource | None,
    *,
    epoch: int,
    total_epochs: int,
    prefetch_batches: int = 0,
    on_step: Callable[[], None] | None = None,
) -> EpochStats:
    """One epoch over `loader`, teacher outputs fetched `prefetch_batches` batches ahead (`prepared_batches`).

    Each batch's uint8 images and its teacher outputs are copied to the device (non-blocking: the loader pins
    them where the config says so) and normalized there, in the same step. With `settings.accumulate_steps`
    k > 1 the optimizer and the schedule step once per k batches, on the mean of their losses. `on_step` is
    called after each batch (progress); the loss is read from the device once, at the epoch's end.
    """
    method = training.method
    method.train()
    wanted = method.teacher_outputs()
    stats = EpochStats()
    sums = _EpochSums(training.device)
    batches = len(loader)  # type: ignore[arg-type]

    def counted(batches_with_counts: Iterable) -> Iterator[tuple]:
        for batch, skipped in batches_with_counts:
            stats.skipped_images += skipped
            yield batch

    start = time.perf_counter()
    training.optimizer.zero_grad(set_to_none=True)
    # Closed on any exit, an exception included: the prefetching thread stops before this frame unwinds, so
    # it never outlives the run inside a teacher forward (that aborts the interpreter at exit).
    batches_with_teachers = prepared_batches(
        counted(readable_batches(loader)), source, wanted, prefetch_batches, training.soft_labels
    )
    with contextlib.closing(batches_with_teachers) as prepared:
        for step, batch in enumerate(prepared):
            stats.stall_seconds += batch.stall_seconds
            clock = TrainingClock(epoch=epoch + step / batches, total_epochs=total_epochs)
            result, labels = _train_step(training, batch, clock)
            if (step + 1) % training.settings.accumulate_steps == 0 or step + 1 == batches:
                training.optimizer.step()
                training.scheduler.step()
                training.optimizer.zero_grad(set_to_none=True)
                stats.optimizer_steps += 1
            stats.samples += labels.shape[0]
            sums.add(result, labels)
            if on_step is not None:
                on_step()
    stats.loss, stats.train_accuracy, stats.terms = sums.per_sample(stats.samples)
    stats.seconds = time.perf_counter() - start
    return stats


def _train_step(
    training: StudentTraining, batch: PreparedBatch, clock: TrainingClock
) -> tuple[LossResult, torch.Tensor]:
    """Forward and backward of one batch (gradients accumulate: the caller steps the optimizer); the loss
    and the batch's labels on the device."""
    settings, device = training.settings, training.device
    teacher_outputs = (
        in_soft_label_form(batch.teachers, training.soft_labels).to(device)
        if batch.teachers is not None
        else None
    )
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    images = batch.images.to(device, non_blocking=True)
    inputs = normalize(images, training.mean, training.std).contiguous(memory_format=memory_format)
    labels = batch.labels.to(device, non_blocking=True)
    step_module = training.step_module if training.step_module is not None else training.method
    with torch.autocast(
        device.type,
        dtype=settings.autocast_dtype or torch.float32,
        enabled=settings.autocast_dtype is not None,
    ):
        result = step_module(inputs, labels, teacher_outputs, clock)
    accumulate = settings.accumulate_steps
    (result.loss / accumulate if accumulate > 1 else result.loss).backward()
    return result, labels


def all_reduce_epoch_stats(stats: EpochStats) -> EpochStats:
    """The epoch's statistics over all workers of the process group: loss, terms and train accuracy averaged
    per sample, samples and skipped images summed, seconds and stall seconds averaged per worker. Every worker
    must call it."""
    names = sorted(stats.terms)
    sums = torch.tensor(
        [
            stats.loss * stats.samples,
            stats.train_accuracy * stats.samples,
            *(stats.terms[k] * stats.samples for k in names),
            stats.samples,
            stats.seconds,
            stats.stall_seconds,
            stats.skipped_images,
        ],
        dtype=torch.float64,
    )
    distributed.all_reduce(sums)
    *weighted, samples, seconds, stall, skipped = sums.tolist()
    workers = distributed.get_world_size()
    per_sample = [w / max(samples, 1) for w in weighted]
    return EpochStats(
        loss=per_sample[0],
        train_accuracy=per_sample[1],
        terms=dict(zip(names, per_sample[2:])),
        samples=int(samples),
        seconds=seconds / workers,
        stall_seconds=stall / workers,
        skipped_images=int(skipped),
        optimizer_steps=stats.optimizer_steps,  # every worker steps together
    )


def all_reduce_counts(counts: dict[str, float]) -> dict[str, float]:
    """Counts summed over all workers of the process group (every worker must call it, with the same keys);
    an int count stays an int (summed exactly as a float64, below 2**53)."""
    names = sorted(counts)
    totals = torch.tensor([counts[k] for k in names], dtype=torch.float64)
    distributed.all_reduce(totals)
    return {
        name: int(total) if isinstance(counts[name], int) else total
        for name, total in zip(names, totals.tolist())
    }


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
    for (images, labels, *_), _skipped in readable_batches(loader):
        scores = predict(normalize(images.to(device, non_blocking=True), mean, std))
        correct += (scores.argmax(1).cpu() == labels).sum().item()
        total += labels.shape[0]
    model.train(was_training)
    return correct / max(total, 1)
