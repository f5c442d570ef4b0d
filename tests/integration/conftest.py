"""Real servers for integration tests: redis-server processes on free 127.0.0.1 ports, in temp dirs."""

from __future__ import annotations

import contextlib
import itertools
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

REDIS_START_TIMEOUT_SECONDS = 10.0
REDIS_PORT_ATTEMPTS = 3


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None and Path("/usr/bin/redis-server").exists():
        binary = "/usr/bin/redis-server"
    if binary is None:
        pytest.fail(
            "redis-server not found on PATH or at /usr/bin/redis-server; the integration tests run a "
            "real one. "
            "Install it: `apt-get install redis-server` (Debian/Ubuntu) or `brew install redis` (macOS).",
            pytrace=False,
        )
    return binary


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RedisServer:
    url: str
    process: subprocess.Popen

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _wait_for_ping(server: RedisServer, log_path: Path) -> bool:
    """True once the server answers PING; False if it exited (e.g. the port was taken meanwhile)."""
    client = redis.Redis.from_url(server.url, socket_connect_timeout=0.5, socket_timeout=0.5)
    deadline = time.monotonic() + REDIS_START_TIMEOUT_SECONDS
    try:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                return False
            with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                if client.ping():
                    return True
            time.sleep(0.05)
    finally:
        client.close()
    server.stop()
    pytest.fail(
        f"redis-server did not answer PING within {REDIS_START_TIMEOUT_SECONDS} s; "
        f"log:\n{log_path.read_text()}",
        pytrace=False,
    )


@contextlib.contextmanager
def running_redis_server(directory: Path, *config_args: str) -> Iterator[RedisServer]:
    """A redis-server on a free 127.0.0.1 port, persisting nothing, with extra `--option value` args."""
    binary = redis_server_binary()
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / "redis.log"
    for _ in range(REDIS_PORT_ATTEMPTS):
        port = free_port()
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", "",
             "--appendonly", "no", "--logfile", str(log_path), *config_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        server = RedisServer(url=f"redis://127.0.0.1:{port}/0", process=process)
        if _wait_for_ping(server, log_path):
            break
    else:
        pytest.fail(f"redis-server exited at start {REDIS_PORT_ATTEMPTS} times; log:\n{log_path.read_text()}",
                    pytrace=False)
    try:
        yield server
    finally:
        server.stop()


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
