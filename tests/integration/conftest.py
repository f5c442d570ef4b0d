"""Real servers and stores for integration tests: redis-server processes on free 127.0.0.1 ports, LMDB in
temporary directories, and a Ray cluster per test worker for the `ekd` commands that run on Ray."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
import torch

from services.cache import open_store
from services.cache.local_redis import (
    RedisCluster,
    RedisServer,
    RedisServerError,
    free_port,
    running_redis_cluster,
)
from services.cache.local_redis import running_redis_server as _running_redis_server
from services.teachers.engine import TeacherEngine
from services.teachers.spec import Preprocessing
from services.teachers.zoo import create_teacher, save_teacher_checkpoint


@contextlib.contextmanager
def running_redis_server(directory: Path, *config_args: str) -> Iterator[RedisServer]:
    """The real server; a missing binary or a failed start fails the test with the reason (never a skip)."""
    try:
        with _running_redis_server(directory, *config_args) as server:
            yield server
    except RedisServerError as err:
        pytest.fail(str(err), pytrace=False)


@pytest.fixture
def free_tcp_port() -> int:
    """A 127.0.0.1 port nothing listens on (until something binds it)."""
    return free_port()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a redis-server shared by the whole session; tests use keys of their own."""
    with running_redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


# Ray's head start, at most; a loaded 2-core machine takes seconds.
RAY_HEAD_START_SECONDS = 120
# Tries of the head's start: on a loaded machine its raylet may die at start, waiting too long for an agent
# of its own (`Timed out waiting for file .../metrics_agent_port_...`), and a new start is the cure.
RAY_HEAD_START_ATTEMPTS = 3
# What the raylet logs once it is up (it waits for its agents before).
RAYLET_STARTED = "started. Raylet consists of"


@dataclass
class _RayHead:
    process: subprocess.Popen
    port: int
    temp_dir: str

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _start_ray_head(env: dict[str, str]) -> _RayHead | str:
    """A head whose raylet is up, or why it is not (the raylet's last lines); stopped when it failed."""
    port = free_port()
    # Short, and not Ray's default: a socket path must fit 107 bytes, and `ray.init()` without an address
    # joins the cluster Ray's default directory names, which would put `ekd serve` on this one.
    temp_dir = tempfile.mkdtemp(prefix="ekd-ray-", dir="/tmp")
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            f"--num-cpus={os.cpu_count()}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a process group of its own: the teardown kills raylet, GCS and workers
    )
    head = _RayHead(process, port, temp_dir)
    raylet_log = Path(temp_dir) / "session_latest" / "logs" / "raylet.out"
    deadline = time.monotonic() + RAY_HEAD_START_SECONDS
    while process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if RAYLET_STARTED in raylet_log.read_text(errors="replace"):
                return head
        time.sleep(0.5)
    if process.poll() is None:
        why = f"no raylet up within {RAY_HEAD_START_SECONDS} s"
    else:
        why = f"`ray start --head` exited with {process.returncode}"
    with contextlib.suppress(OSError):
        why += "; the raylet's last lines:\n" + "\n".join(
            raylet_log.read_text(errors="replace").splitlines()[-5:]
        )
    head.stop()
    return why


@pytest.fixture(scope="session")
def ray_cluster_env() -> Iterator[dict[str, str]]:
    """The environment of an `ekd` command (warm, sweep) that joins this test worker's Ray cluster, through
    RAY_ADDRESS as on a cluster, instead of starting a private instance (GCS, raylet, dashboard and agents):
    measured, a private start and a task cost 8.5 CPU-seconds, joining and the same task 4.3. The cluster is
    as large as a private one (a CPU per core), and only this worker's tests, one at a time, use it.
    Started on first use, its raylet up; killed, every process of it, at the session's end."""
    # One thread per Ray worker, a worker per core: Ray's workers take the head's environment.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    failures = []
    for _ in range(RAY_HEAD_START_ATTEMPTS):
        head = _start_ray_head(env)
        if isinstance(head, _RayHead):
            break
        failures.append(head)
    else:
        raise AssertionError(
            f"Ray's head did not start in {RAY_HEAD_START_ATTEMPTS} tries:\n" + "\n".join(failures)
        )
    try:
        yield {**env, "RAY_ADDRESS": f"127.0.0.1:{head.port}"}
    finally:
        head.stop()


@pytest.fixture(scope="module")
def joined_ray(ray_cluster_env: dict[str, str]) -> Iterator[None]:
    """This process joined to the worker's Ray cluster (`ray_cluster_env`) for a module's tests, which call
    ekd's Ray code in process; disconnected (the cluster stays) at the module's end."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")
        ray.init(address=ray_cluster_env["RAY_ADDRESS"], include_dashboard=False, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()


@pytest.fixture
def start_redis_server(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start dedicated redis-servers (`start("--maxmemory", "2mb")`) that a test may configure or stop;
    all are stopped when the test ends."""
    numbers = itertools.count()
    with contextlib.ExitStack() as servers:

        def start(*config_args: str) -> RedisServer:
            directory = tmp_path / f"redis-{next(numbers)}"
            return servers.enter_context(running_redis_server(directory, *config_args))

        yield start


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A Redis Cluster of three shards (primaries, no replicas) of this test's own, which it may stop."""
    try:
        with running_redis_cluster(tmp_path / "redis-cluster", shards=3) as cluster:
            yield cluster
    except RedisServerError as err:
        pytest.fail(str(err), pytrace=False)


@pytest.fixture(params=["lmdb", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    """An empty output store of each backend: LMDB in tmp_path, or the session's redis-server under a key
    prefix of this test's own."""
    if request.param == "lmdb":
        opened = open_store(str(tmp_path / "cache"))
    else:
        opened = open_store(request.getfixturevalue("redis_url"), key_prefix=f"{request.node.name}:")
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TeacherEngine]:
    """One untrained cifar_resnet20 teacher "a" (10 classes, 16x16 inputs) loaded from a checkpoint, so that
    it has a weights_sha256 and the service caches its outputs."""
    directory = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    preprocessing = Preprocessing.cifar(16)
    untrained = create_teacher("cifar_resnet20", 10, preprocessing=preprocessing)
    save_teacher_checkpoint(directory / "a.pt", untrained, "cifar_resnet20", 10, preprocessing)
    return {"a": TeacherEngine(create_teacher("cifar_resnet20", 10, checkpoint=directory / "a.pt"))}
