"""A private redis-server process on a free 127.0.0.1 port: for tests, benchmarks and local demos.

Production points the cache at a managed Redis by URL; this only starts the Debian `redis-server` binary.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

START_TIMEOUT_SECONDS = 10.0
PORT_ATTEMPTS = 3
# How long a local cluster's shard may go unanswered before the others count it lost: well beyond Redis's
# 15 s, so that a loaded machine starving a shard of CPU does not look like a lost shard (a killed one still
# fails every call that touches it at once).
CLUSTER_NODE_TIMEOUT_MS = 300_000
# A cluster node's bus listens on its port + 10000, so its port may be at most this.
CLUSTER_HIGHEST_PORT = 65535 - 10000


class RedisServerError(RuntimeError):
    """redis-server is missing or did not start."""


def redis_server_binary() -> str:
    binary = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if binary is None:
        raise RedisServerError(
            "redis-server not found on PATH or at /usr/bin/redis-server; install it: "
            "`apt-get install redis-server` (Debian/Ubuntu) or `brew install redis` (macOS)"
        )
    return binary


def free_port(highest: int = 65535) -> int:
    """A 127.0.0.1 port free now, at most `highest` (the system's ephemeral range may reach above it)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port <= highest:
            return port
    raise RedisServerError(f"no free 127.0.0.1 port at or below {highest} in 100 tries")


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
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
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
    raise RedisServerError(
        f"redis-server did not answer PING within {START_TIMEOUT_SECONDS} s; log:\n{log_path.read_text()}"
    )


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS-only server: its certificate and key, and the CA that signed the certificate."""

    cert: Path
    key: Path
    ca: Path


@contextlib.contextmanager
def running_redis_server(
    directory: Path,
    *config_args: str,
    port: int | None = None,
    highest_port: int = 65535,
    tls: TlsFiles | None = None,
) -> Iterator[RedisServer]:
    """A redis-server on 127.0.0.1, persisting nothing, with extra `--option value` args: on `port`, or a free
    one at most `highest_port`. With `tls` it listens only for TLS (clients need no certificate) and its URL
    is `rediss://127.0.0.1:PORT/0?ssl_ca_certs=CA`."""
    binary = redis_server_binary()
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / "redis.log"
    for _ in range(1 if port is not None else PORT_ATTEMPTS):
        listening = port if port is not None else free_port(highest_port)
        ports = ["--port", str(listening)]
        url = f"redis://127.0.0.1:{listening}/0"
        if tls is not None:
            ports = [
                *("--port", "0", "--tls-port", str(listening)),
                *("--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.key)),
                *("--tls-ca-cert-file", str(tls.ca), "--tls-auth-clients", "no"),
            ]
            url = f"rediss://127.0.0.1:{listening}/0?ssl_ca_certs={tls.ca}"
        process = subprocess.Popen(
            [
                binary,
                *ports,
                "--bind",
                "127.0.0.1",
                "--dir",
                str(directory),
                "--save",
                "",
                "--appendonly",
                "no",
                "--logfile",
                str(log_path),
                # As ekd's deployments run Redis (services.cache.redis_store): compact entries' hashes small.
                *("--hash-max-listpack-entries", "512", "--hash-max-listpack-value", "128"),
                *config_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        server = RedisServer(url=url, process=process)
        if _wait_for_ping(server, log_path):
            break
    else:
        raise RedisServerError(f"redis-server exited at start; log:\n{log_path.read_text()}")
    try:
        yield server
    finally:
        server.stop()


@dataclass
class RedisCluster:
    """A local Redis Cluster: one primary per shard, no replicas. `url` is its cache URI."""

    url: str
    shards: list[RedisServer]


def redis_cli_binary() -> str:
    binary = shutil.which("redis-cli")
    if binary is None:
        raise RedisServerError(
            "redis-cli not found on PATH; it ships with redis-server (`apt-get install redis-tools`)"
        )
    return binary


def _wait_for_cluster_ok(url: str) -> None:
    """Until every shard says the cluster is up (the slots are assigned and gossip has spread them)."""
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    try:
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                if client.cluster("info").get("cluster_state") == "ok":
                    return
            time.sleep(0.1)
    finally:
        client.close()
    raise RedisServerError(
        f"the Redis Cluster at {url} did not reach cluster_state:ok in {START_TIMEOUT_SECONDS} s"
    )


@contextlib.contextmanager
def running_redis_cluster(directory: Path, shards: int = 3, *config_args: str) -> Iterator[RedisCluster]:
    """A Redis Cluster of `shards` redis-servers (`--cluster-enabled yes`) on free 127.0.0.1 ports, made with
    `redis-cli --cluster create --cluster-replicas 0`; its URL is `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,.../`."""
    with contextlib.ExitStack() as servers:
        started = [
            servers.enter_context(
                running_redis_server(
                    directory / f"shard-{number}",
                    *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
                    *("--cluster-node-timeout", str(CLUSTER_NODE_TIMEOUT_MS)),
                    *config_args,
                    highest_port=CLUSTER_HIGHEST_PORT,
                )
            )
            for number in range(shards)
        ]
        addresses = [server.url.removeprefix("redis://").removesuffix("/0") for server in started]
        created = subprocess.run(
            [
                redis_cli_binary(),
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_SECONDS * 3,
        )
        if created.returncode != 0:
            raise RedisServerError(f"redis-cli --cluster create failed:\n{created.stdout}{created.stderr}")
        for server in started:
            _wait_for_cluster_ok(server.url)
        yield RedisCluster(url="redis+cluster://" + ",".join(addresses) + "/", shards=started)
