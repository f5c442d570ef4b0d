"""Real servers and stores for integration tests: redis-server processes on free 127.0.0.1 ports, LMDB in
temporary directories."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
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
