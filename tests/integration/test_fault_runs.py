"""The fault suite's training runs: a served-teacher distillation with a Redis cache survives the cache being
killed (kill -9, restarted empty on the same port) or frozen (SIGSTOP for 10 s) in the middle of an epoch, and
finishes as the uninterrupted run does: the same optimizer steps over the same samples, the same losses epoch
by epoch and the same test accuracy. Real redis-server processes, real gRPC on 127.0.0.1, the local
backend."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import torch

from services.backends import LocalBackend
from services.cache import open_store
from services.cache.local_redis import RedisServer, running_redis_server
from services.engine import TeacherEngine
from services.server import BackgroundServer
from services.zoo import create_teacher
from trainer.config import ExperimentConfig
from trainer.experiment import ExperimentResult, ensure_teachers
from trainer.inputs import load_splits
from trainer.progress import ProgressUpdate
from trainer.run import run_experiment

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow]

TEACHER = "t0"
# Long enough (about 0.4 s an epoch here) for the cache to come back mid-run: the breaker probes it again 5 s
# after it went away.
EPOCHS = 36
# Where the fault strikes: this many steps into the second epoch, with some of the epoch's batches fetched.
FAULT_STEP_IN_EPOCH = 2
KILLED_SECONDS = 3.0
FROZEN_SECONDS = 10.0


def experiment(tmp_path: Path, name: str, address: str, cache_uri: str) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {
            "name": name,
            "seed": 0,
            "data": {"dataset": "digits", "image_size": 8, "views": 2, "pad": 1, "batch_size": 128},
            "teachers": [
                {
                    "name": "cifar_resnet20",
                    "checkpoint": str(tmp_path / f"{TEACHER}.pt"),
                    "served_as": TEACHER,
                    "train": {"epochs": 2, "lr": 0.05},
                }
            ],
            "method": {"name": "kd", "student": {"arch": "cifar_resnet8"}},
            "train": {"epochs": EPOCHS, "lr": 0.05},
            "teacher_source": {"kind": "served", "address": address, "cache": cache_uri},
            "output_dir": str(tmp_path / "runs"),
        }
    )


@dataclass
class ServedTeacher:
    tmp_path: Path
    redis: RedisServer
    server: BackgroundServer

    def config(self, name: str) -> ExperimentConfig:
        return experiment(self.tmp_path, name, self.server.address, self.redis.url)

    def steps_per_epoch(self) -> int:
        cfg = self.config("probe")
        return -(-len(load_splits(cfg).train) // cfg.data.batch_size)

    def flush_cache(self) -> None:
        client = redis.Redis.from_url(self.redis.url)
        client.flushall()
        client.close()

    def entries(self) -> int:
        client = redis.Redis.from_url(self.redis.url)
        try:
            return client.dbsize()
        finally:
            client.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServedTeacher]:
    """One trained teacher served over gRPC on 127.0.0.1 with a Redis cache of its own."""
    with running_redis_server(tmp_path / "redis") as redis_server:
        cfg = experiment(tmp_path, "teacher", "127.0.0.1:1", redis_server.url)
        ensure_teachers(cfg, load_splits(cfg), torch.device("cpu"))
        engine = TeacherEngine(create_teacher("cifar_resnet20", 10, checkpoint=tmp_path / f"{TEACHER}.pt"))
        with BackgroundServer(LocalBackend({TEACHER: engine}), store=open_store(redis_server.url)) as server:
            yield ServedTeacher(tmp_path, redis_server, server)


def run_with_fault(cfg: ExperimentConfig, at_step: int, fault: Callable[[], None]) -> ExperimentResult:
    """Run `cfg`, calling `fault` once when its progress reaches step `at_step`; it must have fired."""
    fired = threading.Event()

    def on_progress(update: ProgressUpdate) -> None:
        if update.task == cfg.name and update.completed >= at_step and not fired.is_set():
            fired.set()
            fault()

    result = run_experiment(cfg, on_progress=on_progress)
    assert fired.is_set(), f"the fault never fired: the run has fewer than {at_step} steps"
    return result


def assert_same_run(faulted: ExperimentResult, clean: ExperimentResult) -> None:
    """The same optimizer steps over the same training samples, with the same targets: the same losses, epoch
    by epoch, and the same test accuracy."""
    assert faulted.train_samples == clean.train_samples
    assert faulted.optimizer_steps == clean.optimizer_steps
    assert [row["loss"] for row in faulted.history] == pytest.approx([row["loss"] for row in clean.history])
    assert faulted.test_accuracy == clean.test_accuracy


def test_a_run_survives_redis_killed_mid_epoch_and_restarted_empty(served: ServedTeacher):
    clean = run_experiment(served.config("clean"))
    served.flush_cache()
    port = int(served.redis.url.rsplit(":", 1)[1].split("/")[0])
    with contextlib.ExitStack() as restarted:

        def restart() -> None:
            time.sleep(KILLED_SECONDS)
            restarted.enter_context(running_redis_server(served.tmp_path / "redis-again", port=port))

        restarting = threading.Thread(target=restart, daemon=True)

        def kill_then_restart() -> None:
            os.kill(served.redis.process.pid, signal.SIGKILL)
            served.redis.process.wait(timeout=5)
            restarting.start()

        faulted = run_with_fault(
            served.config("redis-killed"), served.steps_per_epoch() + FAULT_STEP_IN_EPOCH, kill_then_restart
        )
        restarting.join(timeout=30)
        assert served.entries() > 0  # the restarted, empty cache was picked up and written
    assert_same_run(faulted, clean)
    assert faulted.counters["cache_unavailable"] >= 1


def test_a_run_survives_redis_frozen_mid_epoch(served: ServedTeacher):
    clean = run_experiment(served.config("clean"))
    served.flush_cache()
    thawed = threading.Event()
    at_freeze: list[int] = []

    def freeze() -> None:
        at_freeze.append(served.entries())
        os.kill(served.redis.process.pid, signal.SIGSTOP)
        timer = threading.Timer(
            FROZEN_SECONDS, lambda: (os.kill(served.redis.process.pid, signal.SIGCONT), thawed.set())
        )
        timer.daemon = True
        timer.start()

    try:
        started = time.perf_counter()
        faulted = run_with_fault(
            served.config("redis-frozen"), served.steps_per_epoch() + FAULT_STEP_IN_EPOCH, freeze
        )
        seconds = time.perf_counter() - started
    finally:
        os.kill(served.redis.process.pid, signal.SIGCONT)
    assert thawed.is_set() and seconds > FROZEN_SECONDS  # the cache came back mid-run
    assert_same_run(faulted, clean)
    assert faulted.counters["cache_unavailable"] >= 1
    assert served.entries() > at_freeze[0]  # and was written again after the thaw
    # The frozen cache costs a timeout or two, not a wait for the thaw: the run may even end before it.
    assert faulted.stall_seconds < clean.stall_seconds + FROZEN_SECONDS / 2, (seconds, faulted.stall_seconds)


def test_a_run_started_while_redis_is_down_starts_without_it_and_takes_it_up(served: ServedTeacher, caplog):
    """A cache still starting beside the trainer (or down) when the run starts: the run starts without it and
    takes it up once it answers, mid-run."""
    clean = run_experiment(served.config("clean"))
    port = int(served.redis.url.rsplit(":", 1)[1].split("/")[0])
    served.redis.process.kill()
    served.redis.process.wait(timeout=5)
    with contextlib.ExitStack() as started_late:

        def start() -> None:
            started_late.enter_context(running_redis_server(served.tmp_path / "redis-late", port=port))

        faulted = run_with_fault(
            served.config("redis-late"), served.steps_per_epoch() + FAULT_STEP_IN_EPOCH, start
        )
        assert served.entries() > 0  # taken up once it answered, and written
    assert_same_run(faulted, clean)
    assert faulted.counters["cache_unavailable"] >= 1
    assert "starting without the output cache for now" in caplog.text
