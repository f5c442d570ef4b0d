"""The student step's GPU-ready settings, checked on the CPU: the warm-up schedule, gradient accumulation,
bf16 autocast, channels_last, what `auto` resolves to, and torch.compile; the epoch's train accuracy."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainer.config import OptimConfig
from trainer.data import ImageTensorDataset, PadCrop, ReplayedViews, normalize
from trainer.methods.ce import CrossEntropyTraining
from trainer.runs.loop import (
    StepSettings,
    StudentTraining,
    make_scheduler,
    readable_batches,
    train_epoch,
    train_loader,
)

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def learning_rates(cfg: OptimConfig, total: int, warmup: int) -> list[float]:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = make_scheduler(optimizer, cfg, total, warmup_steps=warmup)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_linear_warmup_then_the_schedule_over_the_remaining_steps():
    rates = learning_rates(OptimConfig(lr=1.0, schedule="cosine"), total=14, warmup=4)
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    after = [0.5 * (1 + math.cos(math.pi * k / 10)) for k in range(10)]
    assert rates[4:] == pytest.approx(after)
    assert learning_rates(OptimConfig(lr=1.0, schedule="constant"), 5, 0) == [1.0] * 5


def tiny_views(samples: int = 64) -> ReplayedViews:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (samples, 3, 8, 8), dtype=torch.uint8, generator=generator)
    return ReplayedViews(
        ImageTensorDataset(images, torch.arange(samples) % 4), seed=0, views=0, maker=PadCrop(0, False)
    )


def linear_student() -> CrossEntropyTraining:
    torch.manual_seed(0)
    return CrossEntropyTraining(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)))


def one_epoch(method, batch_size: int, settings: StepSettings) -> tuple[int, EpochSteps]:
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    steps = EpochSteps()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: steps.count(step))
    training = StudentTraining(
        method, optimizer, scheduler, torch.device("cpu"), MEAN, STD, settings=settings
    )
    stats = train_epoch(
        training, train_loader(tiny_views(), batch_size, seed=0, epoch=0), None, epoch=0, total_epochs=1
    )
    return stats.samples, steps


class EpochSteps:
    """Counts the scheduler's steps (LambdaLR calls its lambda once at construction, then once a step)."""

    def __init__(self) -> None:
        self.calls = 0

    def count(self, step: int) -> float:
        self.calls += 1
        return 1.0

    @property
    def optimizer_steps(self) -> int:
        return self.calls - 1


def test_accumulating_two_batches_of_16_steps_like_one_batch_of_32():
    # The loader's order depends on the seed, not the batch size, so batches 2k and 2k+1 of 16 are batch k of
    # 32; with a linear model and a mean loss, the mean of their gradients is that batch's gradient.
    accumulated, whole = linear_student(), linear_student()
    samples, steps = one_epoch(accumulated, 16, StepSettings(accumulate_steps=2))
    _, whole_steps = one_epoch(whole, 32, StepSettings())
    assert samples == 64 and steps.optimizer_steps == whole_steps.optimizer_steps == 2
    for a, b in zip(accumulated.parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_train_accuracy_counts_the_methods_predictions_on_the_batches_it_trained():
    method = linear_student()
    optimizer = torch.optim.SGD(method.parameters(), lr=0.0)  # the model stays as it was: count it after
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    training = StudentTraining(method, optimizer, scheduler, torch.device("cpu"), MEAN, STD)
    stats = train_epoch(
        training, train_loader(tiny_views(), 16, seed=0, epoch=0), None, epoch=0, total_epochs=1
    )
    correct = 0
    with torch.no_grad():
        for (images, labels, *_), _ in readable_batches(train_loader(tiny_views(), 16, seed=0, epoch=0)):
            correct += int((method.predict(normalize(images, MEAN, STD)).argmax(1) == labels).sum())
    assert 0 < correct < 64  # a random linear model is right on some of four classes, not all
    assert stats.train_accuracy == pytest.approx(correct / 64)


def test_bf16_autocast_and_channels_last_train_on_the_cpu():
    method = linear_student()
    conv = CrossEntropyTraining(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    ).to(memory_format=torch.channels_last)
    for student in (method, conv):
        samples, _ = one_epoch(student, 16, StepSettings(torch.bfloat16, channels_last=True))
        assert samples == 64
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in student.parameters())


def test_auto_is_fp32_on_the_cpu_and_explicit_choices_hold():
    cpu = torch.device("cpu")
    assert StepSettings.resolve(OptimConfig(), cpu) == StepSettings(None, False, 1)
    chosen = StepSettings.resolve(OptimConfig(precision="bf16", channels_last=True, accumulate_steps=4), cpu)
    assert chosen == StepSettings(torch.bfloat16, True, 4)


def test_label_smoothing_reaches_every_hard_label_term():
    method = linear_student()
    images, labels = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    logits = method.model(images)
    plain = method.hard_label_loss(logits, labels)
    method.label_smoothing = 0.1
    smoothed = method.hard_label_loss(logits, labels)
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    assert torch.equal(smoothed, expected) and not torch.equal(plain, smoothed)
