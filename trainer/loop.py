"""Training and evaluation steps and epochs, in plain PyTorch (the Ray Train adapter wraps these)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from trainer.config import OptimConfig
from trainer.data import ReplayedViews, normalize
from trainer.methods.base import Method, TrainingClock
from trainer.sources import TeacherSource

ProgressCallback = Callable[[int, int, dict[str, float]], None]  # (step, total_steps, latest metrics)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(device)


def make_optimizer(param_groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """Per-step schedule, so that short runs on small data follow the same curve as long ones."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))
    if cfg.schedule == "multistep":
        steps = [int(m * total_steps) for m in cfg.milestones]
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cfg.gamma ** sum(step >= s for s in steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def train_loader(views: ReplayedViews, batch_size: int, seed: int, epoch: int) -> DataLoader:
    """The epoch's batches: the replayed view of each sample for this epoch, in a seeded order."""
    views.set_epoch(epoch)
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return DataLoader(views, batch_size=batch_size, shuffle=True, generator=generator, drop_last=False)


def eval_loader(dataset: Dataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


@dataclass
class EpochStats:
    loss: float = 0.0
    terms: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    seconds: float = 0.0
    stall_seconds: float = 0.0  # time the student waited for teacher outputs


def train_epoch(method: Method, loader: Iterable, source: TeacherSource | None,
                optimizer: torch.optim.Optimizer, scheduler, *, epoch: int, total_epochs: int,
                mean: Sequence[float], std: Sequence[float], device: torch.device,
                on_step: Callable[[dict[str, float]], None] | None = None,
                step_module: nn.Module | None = None) -> EpochStats:
    """One epoch over `loader`. `step_module` is what computes the loss: the method itself, or a
    DistributedDataParallel wrapper of it (Ray Train), which all-reduces gradients during backward."""
    step_module = step_module or method
    method.train()
    wanted = method.teacher_outputs()
    stats = EpochStats()
    batches = len(loader)  # type: ignore[arg-type]
    start = time.perf_counter()
    for step, (images, labels, *_ids) in enumerate(loader):
        teacher_outputs = None
        if wanted and source is not None:
            wait = time.perf_counter()
            teacher_outputs = source.fetch(images, wanted).to(device)
            stats.stall_seconds += time.perf_counter() - wait
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


@torch.no_grad()
def evaluate(predict: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, loader: Iterable,
             mean: Sequence[float], std: Sequence[float], device: torch.device) -> float:
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
