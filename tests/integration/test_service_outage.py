"""The trainer waits for a teacher service that stops answering and goes on from the same batch.

Fast tests: a served source over real gRPC on 127.0.0.1, the service stopped and started again on the same
port, with the batches fetched in the training thread (depth 0) and prefetched; a service not up yet when the
run starts; the budget's end is one line; a consumer that stops ends a wait at once.

Slow test: a local run against a teacher service in another process, killed with SIGKILL mid-epoch and started
again on the same port 10 s later (a cold start): the run finishes exactly as the uninterrupted one does, and
its counters show the outage.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from services.cache.local_redis import free_port
from services.core.errors import UserError
from services.rpc.backends import LocalBackend
from services.rpc.client import TeacherServiceChanged, TeacherServiceUnavailable
from services.rpc.server import BackgroundServer
from services.teachers.engine import TeacherEngine
from services.teachers.spec import Preprocessing
from services.teachers.zoo import create_teacher, save_teacher_checkpoint
from trainer.config import ExperimentConfig
from trainer.runs.outage import OutageWait
from trainer.runs.prefetch import prepared_batches
from trainer.runs.progress import ProgressUpdate
from trainer.runs.run import run_experiment
from trainer.runs.sources import ServedTeacherSource

pytestmark = pytest.mark.integration

PRE = Preprocessing(input_size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
BATCHES = 12
DOWN_SECONDS = 1.5  # how long the fast tests keep the service down
# Within fp16 rounding of the logits: the wire dtype.
FP16_TOLERANCE = 1e-2


@pytest.fixture
def engine() -> TeacherEngine:
    torch.manual_seed(0)
    return TeacherEngine(create_teacher("cifar_resnet20", 10, preprocessing=PRE))


def batches(n: int = BATCHES, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randint(0, 256, (size, 3, 8, 8), dtype=torch.uint8, generator=g),
            torch.arange(size) % 10,
            torch.arange(size),
        )
        for _ in range(n)
    ]


def restarted_later(engine: TeacherEngine, port: int, delay: float, started: list) -> threading.Thread:
    """A thread that starts the service again on `port` after `delay` seconds (appended to `started`)."""

    def start() -> None:
        time.sleep(delay)
        started.append(BackgroundServer(LocalBackend({"t0": engine}), address=f"127.0.0.1:{port}"))

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("depth", [0, 2])
def test_the_same_batch_is_asked_again_once_the_service_is_back(engine, depth, caplog):
    data = batches()
    server = BackgroundServer(LocalBackend({"t0": engine}))
    port = server.running.port
    source = ServedTeacherSource(
        server.address, ["t0"], max_in_flight=2, outage_wait=OutageWait(30, max_backoff_seconds=0.5)
    )
    restarted: list[BackgroundServer] = []
    got = []
    try:
        with caplog.at_level(logging.WARNING, logger="trainer.runs"):
            for step, batch in enumerate(prepared_batches(data, source, [["logits"]], depth)):
                got.append(batch)
                if step == 1:  # the prefetcher holds a few batches; the others meet the outage
                    server.close()
                    restarter = restarted_later(engine, port, DOWN_SECONDS, restarted)
        restarter.join(timeout=30)
    finally:
        source.close()
        for running in (server, *restarted):
            running.close()
    # Every batch, in order, with its own teacher outputs: none skipped, none repeated.
    assert len(got) == len(data)
    for (images, labels, _), batch in zip(data, got):
        assert torch.equal(batch.images, images) and torch.equal(batch.labels, labels)
        expected = engine.infer(images, ["logits"])["logits"]
        assert torch.allclose(batch.teachers.logits[0], expected, atol=FP16_TOLERANCE)
    counters = source.counters()
    assert counters["service_outages"] == 1
    # Counted from the client's giving up (after its own retries, about 1.4 s) to the service's answer.
    assert 0 < counters["outage_wait_seconds"] < 30
    assert counters["teacher_calls"] == len(data)  # a failed request is not an answered one
    # A request in flight when the server closes ends CANCELLED; one sent after it, UNAVAILABLE.
    assert re.search(
        rf"teacher service at {server.address} unreachable \((UNAVAILABLE|CANCELLED)\); waiting up to 30 s",
        caplog.text,
    )
    assert "(attempt 1 in 1.0 s)" not in caplog.text  # the pauses are capped at 0.5 s
    assert f"teacher service at {server.address} is back after" in caplog.text


def test_a_service_back_with_another_teacher_under_the_same_name_stops_the_run(engine):
    server = BackgroundServer(LocalBackend({"t0": engine}))
    port = server.running.port
    source = ServedTeacherSource(server.address, ["t0"], outage_wait=OutageWait(30, max_backoff_seconds=0.5))
    other = TeacherEngine(create_teacher("cifar_resnet32", 10, preprocessing=PRE))  # another identity
    restarted: list[BackgroundServer] = []
    images = batches(1)[0][0]
    try:
        source.fetch(images, [["logits"]])
        server.close()
        restarted_later(other, port, DOWN_SECONDS, restarted).join(timeout=30)
        with pytest.raises(TeacherServiceChanged, match="are not the ones expected"):
            source.fetch(images, [["logits"]])
    finally:
        source.close()
        for running in (server, *restarted):
            running.close()


def test_a_service_not_up_yet_is_waited_for(engine):
    port = free_port()
    started: list[BackgroundServer] = []
    restarted_later(engine, port, DOWN_SECONDS, started)
    source = ServedTeacherSource(
        f"127.0.0.1:{port}", ["t0"], outage_wait=OutageWait(30, max_backoff_seconds=0.5)
    )
    try:
        assert source.describe(8)[0].name == "t0"
        assert source.fetch(batches(n=1)[0][0], [["logits"]]).logits[0].shape == (8, 10)
        assert source.counters()["service_outages"] == 1
    finally:
        source.close()
        for running in started:
            running.close()


def test_beyond_the_budget_the_error_is_one_line_naming_it(engine):
    server = BackgroundServer(LocalBackend({"t0": engine}))
    source = ServedTeacherSource(server.address, ["t0"], outage_wait=OutageWait(1.0, max_backoff_seconds=0.3))
    server.close()
    images = batches(n=1)[0][0]
    started = time.monotonic()
    try:
        with pytest.raises(TeacherServiceUnavailable) as caught:
            source.fetch(images, [["logits"]])
    finally:
        source.close()
    message = str(caught.value)
    assert isinstance(caught.value, UserError) and "\n" not in message
    assert message.startswith(f"teacher service at {server.address} unreachable for ")
    assert "beyond teacher_source.outage_wait_seconds (1 s)" in message
    assert time.monotonic() - started < 15  # the budget, plus the client's own retries of the last attempt
    assert source.counters()["service_outages"] == 1


def test_no_budget_means_no_wait(engine):
    server = BackgroundServer(LocalBackend({"t0": engine}))
    source = ServedTeacherSource(server.address, ["t0"], outage_wait=OutageWait(0, max_backoff_seconds=1))
    server.close()
    try:
        with pytest.raises(TeacherServiceUnavailable, match=r"outage_wait_seconds \(0 s\)"):
            source.fetch(batches(n=1)[0][0], [["logits"]])
    finally:
        source.close()
    assert source.counters()["outage_wait_seconds"] < 1


def test_a_consumer_that_stops_ends_the_wait_at_once(engine):
    server = BackgroundServer(LocalBackend({"t0": engine}))
    source = ServedTeacherSource(server.address, ["t0"], outage_wait=OutageWait(600, max_backoff_seconds=5))
    closed = threading.Event()

    def fed_after_the_close():
        """The batches, the second only once the service is closed: the fetching thread cannot have fetched
        ahead before the close, however fast the machine."""
        first, *rest = batches()
        yield first
        closed.wait(60)
        yield from rest

    try:
        iterator = prepared_batches(fed_after_the_close(), source, [["logits"]], depth=1)
        next(iterator)
        server.close()
        closed.set()
        # Until the fetching thread waits for the service: bounded, yet long enough for a loaded machine.
        deadline = time.monotonic() + 120
        while not source.outages and time.monotonic() < deadline:
            time.sleep(0.05)
        assert source.outages == 1
        started = time.monotonic()
        iterator.close()
        assert time.monotonic() - started < 5  # not the 600 s budget
        assert not any(t.name == "ekd-teacher-prefetch" for t in threading.enumerate())
    finally:
        source.close()


# --- a real service process, killed and started again ---------------------------------------------------

SERVE = """
import sys, time
from services.rpc.backends import LocalBackend
from services.teachers.engine import TeacherEngine
from services.rpc.server import BackgroundServer
from services.teachers.zoo import create_teacher
checkpoint, port = sys.argv[1], sys.argv[2]
engines = {"t0": TeacherEngine(create_teacher("cifar_resnet20", 10, checkpoint=checkpoint))}
with BackgroundServer(LocalBackend(engines), address=f"127.0.0.1:{port}"):
    print("ready", flush=True)
    time.sleep(3600)
"""
SERVE_READY_SECONDS = 120
KILLED_SECONDS = 10.0  # the service stays dead this long, then starts cold (a new process)
EPOCHS = 2
FAULT_STEP_IN_EPOCH = 3  # the kill comes this many steps into the second epoch


def start_service(checkpoint: Path, port: int) -> subprocess.Popen:
    """A teacher service process on 127.0.0.1:`port`, once it says it is ready."""
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE, str(checkpoint), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    ready = threading.Event()
    threading.Thread(
        target=lambda: process.stdout.readline() == "ready\n" and ready.set(), daemon=True
    ).start()
    if not ready.wait(SERVE_READY_SECONDS):
        process.kill()
        raise AssertionError(f"the teacher service on port {port} did not start: {process.stdout.read()}")
    return process


@pytest.fixture
def service_processes() -> Iterator[list[subprocess.Popen]]:
    processes: list[subprocess.Popen] = []
    yield processes
    for process in processes:
        process.kill()
        process.wait(timeout=30)


def experiment(tmp_path: Path, name: str, address: str, timeout_seconds: float = 120) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {
            "name": name,
            "seed": 0,
            "device": "cpu",
            "data": {"dataset": "digits", "image_size": 8, "views": 2, "pad": 1, "batch_size": 128},
            "teachers": [
                {"name": "cifar_resnet20", "checkpoint": str(tmp_path / "t0.pt"), "served_as": "t0"}
            ],
            "method": {"name": "kd", "student": {"arch": "cifar_resnet8"}},
            "train": {"epochs": EPOCHS, "lr": 0.05},
            # No cache: every batch goes to the service, so the outage cannot be missed.
            "teacher_source": {
                "kind": "served",
                "address": address,
                "outage_wait_seconds": 120,
                "outage_backoff_max_seconds": 2,
                "timeout_seconds": timeout_seconds,
            },
            "output_dir": str(tmp_path / "runs"),
        }
    )


def once_at_step(step: int, action: Callable[[], None]) -> Callable[[ProgressUpdate], None]:
    """A progress callback that runs `action` once, when the experiment's bar reaches `step`."""
    fired = threading.Event()

    def on_progress(update: ProgressUpdate) -> None:
        if update.total > 0 and update.completed >= step and not fired.is_set():
            fired.set()
            action()

    return on_progress


@pytest.mark.faults
@pytest.mark.slow
def test_a_run_waits_for_a_killed_service_and_finishes_as_if_uninterrupted(tmp_path, service_processes):
    torch.manual_seed(0)
    checkpoint = tmp_path / "t0.pt"
    save_teacher_checkpoint(checkpoint, create_teacher("cifar_resnet20", 10).model, "cifar_resnet20", 10, PRE)
    port = free_port()
    address = f"127.0.0.1:{port}"
    service_processes.append(start_service(checkpoint, port))
    clean = run_experiment(experiment(tmp_path, "clean", address))

    def kill_and_restart_later() -> None:
        killed = service_processes[-1]
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(timeout=30)

        def restart() -> None:
            time.sleep(KILLED_SECONDS)
            service_processes.append(start_service(checkpoint, port))

        threading.Thread(target=restart, daemon=True).start()

    steps_per_epoch = clean.optimizer_steps // EPOCHS
    cfg = experiment(tmp_path, "killed", address)
    faulted = run_experiment(
        cfg, on_progress=once_at_step(steps_per_epoch + FAULT_STEP_IN_EPOCH, kill_and_restart_later)
    )

    assert len(service_processes) == 2  # killed once, started again
    # The same batches, the same targets, the same updates: the same student.
    assert [row["loss"] for row in faulted.history] == [row["loss"] for row in clean.history]
    assert faulted.optimizer_steps == clean.optimizer_steps
    assert faulted.test_accuracy == clean.test_accuracy
    assert faulted.counters["teacher_calls"] == clean.counters["teacher_calls"]
    assert faulted.counters["remote_samples"] > clean.counters["remote_samples"]  # the batches asked again
    assert clean.counters["service_outages"] == 0 and clean.counters["outage_wait_seconds"] == 0
    assert faulted.counters["service_outages"] == 1
    # The wait starts once a fetch has failed (after the client's own retries, about 1.4 s) and ends when the
    # new process answers, KILLED_SECONDS after the kill and its start-up later.
    assert KILLED_SECONDS / 2 <= faulted.counters["outage_wait_seconds"] < 120


FROZEN_SECONDS = 8.0
FROZEN_TIMEOUT_SECONDS = 2.0  # teacher_source.timeout_seconds of the frozen-service run


@pytest.mark.faults
@pytest.mark.slow
def test_a_run_waits_out_a_frozen_service_and_finishes_as_if_uninterrupted(tmp_path, service_processes):
    """SIGSTOP of the service mid-epoch: its requests time out (DEADLINE_EXCEEDED), the run asks again for the
    same batch until the service answers (SIGCONT after FROZEN_SECONDS), and ends as the clean run does."""
    torch.manual_seed(0)
    checkpoint = tmp_path / "t0.pt"
    save_teacher_checkpoint(checkpoint, create_teacher("cifar_resnet20", 10).model, "cifar_resnet20", 10, PRE)
    port = free_port()
    address = f"127.0.0.1:{port}"
    service_processes.append(start_service(checkpoint, port))
    clean = run_experiment(experiment(tmp_path, "clean", address, FROZEN_TIMEOUT_SECONDS))
    frozen = service_processes[-1]

    def freeze() -> None:
        os.kill(frozen.pid, signal.SIGSTOP)
        thaw = threading.Timer(FROZEN_SECONDS, os.kill, (frozen.pid, signal.SIGCONT))
        thaw.daemon = True
        thaw.start()

    steps_per_epoch = clean.optimizer_steps // EPOCHS
    try:
        faulted = run_experiment(
            experiment(tmp_path, "frozen", address, FROZEN_TIMEOUT_SECONDS),
            on_progress=once_at_step(steps_per_epoch + FAULT_STEP_IN_EPOCH, freeze),
        )
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    assert [row["loss"] for row in faulted.history] == [row["loss"] for row in clean.history]
    assert faulted.optimizer_steps == clean.optimizer_steps
    assert faulted.test_accuracy == clean.test_accuracy
    assert faulted.counters["teacher_calls"] == clean.counters["teacher_calls"]
    assert faulted.counters["service_outages"] >= 1
    assert FROZEN_SECONDS / 2 <= faulted.counters["outage_wait_seconds"] < 120
