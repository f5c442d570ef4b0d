"""Prefetched teacher outputs: same batches, same order, same values; errors reach the training thread."""

import threading
import time

import pytest
import torch

from services.teachers.spec import Preprocessing
from services.teachers.zoo import create_teacher
from trainer.runs.prefetch import prepared_batches
from trainer.runs.sources import InProcessTeacherSource

PRE = Preprocessing(input_size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture
def source():
    torch.manual_seed(0)
    return InProcessTeacherSource([create_teacher("cifar_resnet20", 10, preprocessing=PRE)])


def batches(n=5, size=4):
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randint(0, 256, (size, 3, 8, 8), dtype=torch.uint8, generator=g),
            torch.arange(size) % 10,
            torch.arange(size),
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetched_batches_equal_direct_fetches(source, depth):
    data = batches()
    got = list(prepared_batches(data, source, [["logits", "layer3"]], depth))
    assert len(got) == len(data)
    for (images, labels, _), batch in zip(data, got):
        assert torch.equal(batch.images, images) and torch.equal(batch.labels, labels)
        expected = source.engines[0].infer(images, ["logits", "layer3"])
        assert torch.allclose(batch.teachers.logits[0], expected["logits"])
        assert torch.allclose(batch.teachers.features[0]["layer3"], expected["layer3"])
        assert batch.stall_seconds >= 0


def test_fetching_runs_ahead_of_the_consumer(source):
    data = batches(n=6)
    calls_before = source.engines[0].calls
    iterator = prepared_batches(data, source, [["logits"]], depth=2)
    next(iterator)
    # The worker keeps fetching while the consumer holds batch 0: batch 0 handed over, two queued, one in
    # hand.
    for _ in range(200):  # bounded wait for the worker
        if source.engines[0].calls - calls_before >= 3:
            break
        time.sleep(0.05)
    assert source.engines[0].calls - calls_before >= 3
    assert len(list(iterator)) == 5


def test_no_teachers_wanted_means_no_fetch(source):
    calls = source.engines[0].calls
    got = list(prepared_batches(batches(n=2), source, [[]], depth=2))
    assert [b.teachers for b in got] == [None, None] and source.engines[0].calls == calls


def test_fetch_errors_reach_the_training_thread(source):
    bad = [(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), torch.arange(2))]  # float, not uint8
    with pytest.raises(ValueError, match="uint8"):
        list(prepared_batches(bad, source, [["logits"]], depth=2))


def test_stopping_early_stops_the_worker(source):
    iterator = prepared_batches(batches(n=6), source, [["logits"]], depth=1)
    next(iterator)
    iterator.close()
    assert not any(t.name == "ekd-teacher-prefetch" for t in threading.enumerate())
