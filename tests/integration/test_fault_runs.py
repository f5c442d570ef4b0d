"""The fault suite's training runs: a served-teacher distillation with a Redis cache survives the cache being
killed (kill -9, restarted empty on the same port), frozen (SIGSTOP) or absent at the start, and finishes as
the uninterrupted run does: the same optimizer steps over the same samples, the same losses epoch by epoch and
the same test accuracy. Real redis-server processes, real gRPC on 127.0.0.1, the local backend.

The faults follow the run's steps, not the clock: each strikes at a step, the cache comes back at a later
step, and the run is held there until the guard may have probed it again, so that the cache is taken up
mid-run on a machine of any speed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import torch

from services.cache import open_store
from services.cache.guard import DEFAULT_COOLDOWN_SECONDS
from services.cache.local_redis import RedisServer, running_redis_server
from services.rpc.backends import LocalBackend
from services.rpc.server import BackgroundServer
from services.teachers.engine import TeacherEngine
from services.teachers.zoo import create_teacher
from trainer.config import ExperimentConfig
from trainer.runs.experiment import ExperimentResult, ensure_teachers
from trainer.runs.inputs import load_splits
from trainer.runs.progress import ProgressUpdate
from trainer.runs.run import run_experiment

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow]

TEACHER = "t0"
# Epochs after the cache comes back re-read the views missed while it was away (views replay every 2 epochs),
# so the cache is written again before the run ends.
EPOCHS = 8
# Where the fault strikes: this many steps into the second epoch, with some of the epoch's batches fetched.
FAULT_STEP_IN_EPOCH = 2
# A frozen cache stays frozen at least this long, and at least one epoch of steps.
FROZEN_SECONDS = 10.0
# The run is held this long after the cache comes back: the guard probes a cache that went away only after
# its cooldown, counted from the failure that opened it.
HOLD_FOR_PROBE_SECONDS = DEFAULT_COOLDOWN_SECONDS + 1.0


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


def run_with_fault(
    cfg: ExperimentConfig,
    at_step: int,
    fault: Callable[[], None],
    recover_at_step: int,
    recover: Callable[[], None],
) -> ExperimentResult:
    """Run `cfg`, calling `fault` when its progress reaches step `at_step` and `recover` at `recover_at_step`
    (both must fire); the run is then held for the guard's probe, so that it cannot end before the cache is
    taken up again, however fast this machine is."""
    fired: list[str] = []

    def on_progress(update: ProgressUpdate) -> None:
        if update.task != cfg.name:
            return
        if update.completed >= at_step and "fault" not in fired:
            fired.append("fault")
            fault()
        if update.completed >= recover_at_step and "recover" not in fired:
            fired.append("recover")
            recover()
            time.sleep(HOLD_FOR_PROBE_SECONDS)

    result = run_experiment(cfg, on_progress=on_progress)
    assert fired == ["fault", "recover"], f"the run has fewer than {recover_at_step} steps: {fired}"
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
    fault_step = served.steps_per_epoch() + FAULT_STEP_IN_EPOCH
    with contextlib.ExitStack() as restarted:

        def kill() -> None:
            os.kill(served.redis.process.pid, signal.SIGKILL)
            served.redis.process.wait(timeout=5)

        def restart() -> None:
            restarted.enter_context(running_redis_server(served.tmp_path / "redis-again", port=port))

        # Down for one epoch of steps: every fetch of that epoch meets the dead cache.
        faulted = run_with_fault(
            served.config("redis-killed"), fault_step, kill, fault_step + served.steps_per_epoch(), restart
        )
        assert served.entries() > 0  # the restarted, empty cache was picked up and written
    assert_same_run(faulted, clean)
    assert faulted.counters["cache_unavailable"] >= 1


def test_a_run_survives_redis_frozen_mid_epoch(served: ServedTeacher):
    clean = run_experiment(served.config("clean"))
    served.flush_cache()
    at_freeze: list[int] = []
    frozen_at: list[float] = []
    fault_step = served.steps_per_epoch() + FAULT_STEP_IN_EPOCH

    def freeze() -> None:
        at_freeze.append(served.entries())
        os.kill(served.redis.process.pid, signal.SIGSTOP)
        frozen_at.append(time.monotonic())

    def thaw() -> None:
        # One epoch of steps ran against the frozen cache; the run waits out the rest of the freeze here.
        time.sleep(max(0.0, frozen_at[0] + FROZEN_SECONDS - time.monotonic()))
        os.kill(served.redis.process.pid, signal.SIGCONT)

    try:
        faulted = run_with_fault(
            served.config("redis-frozen"), fault_step, freeze, fault_step + served.steps_per_epoch(), thaw
        )
    finally:
        os.kill(served.redis.process.pid, signal.SIGCONT)
    assert_same_run(faulted, clean)
    assert faulted.counters["cache_unavailable"] >= 1
    assert served.entries() > at_freeze[0]  # the cache came back mid-run and was written again
    # The epoch of steps on the frozen cache cost a read timeout or two, not a wait for the thaw.
    assert faulted.stall_seconds < clean.stall_seconds + FROZEN_SECONDS / 2, faulted.stall_seconds


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

        start_step = served.steps_per_epoch() + FAULT_STEP_IN_EPOCH
        faulted = run_with_fault(served.config("redis-late"), 0, lambda: None, start_step, start)
        assert served.entries() > 0  # taken up once it answered, and written
    assert_same_run(faulted, clean)
    assert faulted.counters["cache_unavailable"] >= 1
    assert "starting without the output cache for now" in caplog.text
