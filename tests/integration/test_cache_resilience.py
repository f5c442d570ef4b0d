"""Degrade, never die: the cache failing under a real teacher server and client, by fault injection on real
redis-server processes (SIGSTOP to freeze one, SIGKILL to lose it, a restart on the same port to get it back).

Every wait is bounded, and every frozen server is continued and stopped in a `finally`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import statistics
import time
from collections.abc import Iterator

import pytest
import redis
import torch

from services.cache import GuardedStore, Outcome, input_digest, open_store, output_key
from services.cache.local_redis import RedisServer, running_redis_server
from services.cache.redis_store import DEFAULT_SOCKET_TIMEOUT_SECONDS, RedisStore
from services.cache.writer import BackgroundWriter
from services.rpc.backends import LocalBackend
from services.rpc.client import TeacherClient
from services.rpc.server import BackgroundServer

pytestmark = [pytest.mark.integration, pytest.mark.faults]

DEADLINE_SECONDS = 20.0
NUM_CLASSES = 10
COOLDOWN_SECONDS = 0.3


def images(seed: int, batch: int = 8) -> torch.Tensor:
    return torch.randint(
        0, 256, (batch, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def logits(seed: int) -> torch.Tensor:
    return torch.randn(NUM_CLASSES, generator=torch.Generator().manual_seed(seed)).to(torch.float16)


def key_for(seed: int) -> bytes:
    return output_key("resilience-teacher", "logits", "float16", 0, input_digest(images(seed, 1)[0]))


@contextlib.contextmanager
def frozen(server: RedisServer) -> Iterator[None]:
    """The server stopped (SIGSTOP: its socket accepts connections, nothing answers); always continued."""
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


def wait_until(condition, seconds: float = DEADLINE_SECONDS) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def timed(call) -> tuple[float, object]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def guard_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "services.cache.guard" and record.levelno == logging.WARNING
    ]


# ---- the breaker on a frozen server ---------------------------------------------------------------------


def test_frozen_redis_costs_one_short_timeout_then_microseconds_and_is_found_again(
    start_redis_server, caplog
):
    server = start_redis_server()
    caplog.set_level(logging.INFO, logger="services.cache.guard")
    keys = [key_for(seed) for seed in range(64)]
    with RedisStore(server.url) as store:
        guard = GuardedStore(store, cooldown_seconds=COOLDOWN_SECONDS)
        assert guard.put_many([(key, logits(i)) for i, key in enumerate(keys)]) is Outcome.DONE
        with frozen(server):
            first_seconds, first = timed(lambda: guard.get_many(keys))
            assert first.outcome is Outcome.FAILED and first.values == [None] * len(keys)
            skipped = [timed(lambda: guard.get_many(keys)) for _ in range(200)]
            assert {lookup.outcome for _, lookup in skipped} == {Outcome.SKIPPED}
            assert guard.put_many([(keys[0], logits(0))]) is Outcome.SKIPPED
            # Past the cooldown a probe starts in a thread of its own; callers still answer at once.
            time.sleep(COOLDOWN_SECONDS * 1.5)
            probing = [timed(lambda: guard.get_many(keys))[0] for _ in range(20)]
            assert not guard.available
        assert wait_until(lambda: guard.get_many(keys).outcome is Outcome.DONE)
        assert all(torch.equal(value, logits(i)) for i, value in enumerate(guard.get_many(keys).values))
    skipped_seconds = [seconds for seconds, _ in skipped]
    print(
        f"frozen redis: first get_many {first_seconds * 1000:.0f} ms; while open: median "
        f"{statistics.median(skipped_seconds) * 1e6:.1f} us, worst {max(skipped_seconds) * 1e6:.0f} us; "
        f"while probing: worst {max(probing) * 1e6:.0f} us"
    )
    assert DEFAULT_SOCKET_TIMEOUT_SECONDS <= first_seconds < DEFAULT_SOCKET_TIMEOUT_SECONDS + 0.5
    assert statistics.median(skipped_seconds) < 1e-3 and max(probing) < 0.05
    assert guard.stats.outages == 1 and guard.stats.skipped >= 221 and guard.stats.failures >= 1
    assert len(guard_warnings(caplog)) == 1
    assert any(
        "is back" in record.getMessage() for record in caplog.records if record.levelno == logging.INFO
    )


def test_a_realistic_mget_fits_well_within_the_read_timeout(start_redis_server):
    """512 fp16 1000-class logits (a 256-image batch of two teachers), 64 fp16 [256, 14, 14] feature maps."""
    server = start_redis_server()
    batches = {
        "logits": [torch.randn(1000).half() for _ in range(512)],
        "feature maps": [torch.randn(256, 14, 14).half() for _ in range(64)],
    }
    with RedisStore(server.url) as store:
        for name, values in batches.items():
            keys = [
                output_key("mget", name.replace(" ", "_"), "float16", 0, key_for(i)[-16:])
                for i in range(len(values))
            ]
            store.put_many(list(zip(keys, values, strict=True)))
            seconds = min(timed(lambda keys=keys: store.get_many(keys))[0] for _ in range(3))
            megabytes = sum(value.numel() * 2 for value in values) / 2**20
            print(f"MGET of {len(values)} {name} ({megabytes:.1f} MiB): {seconds * 1000:.1f} ms")
            assert seconds < DEFAULT_SOCKET_TIMEOUT_SECONDS


def test_pending_writes_are_bounded_and_a_frozen_cache_holds_up_no_submitter(start_redis_server):
    server = start_redis_server()
    written: list[tuple[str, Outcome, int]] = []
    with RedisStore(server.url) as store:
        writer = BackgroundWriter(
            GuardedStore(store, cooldown_seconds=COOLDOWN_SECONDS),
            max_pending_values=3,
            on_written=lambda *report: written.append(report),
        )
        with frozen(server):
            first_seconds, queued = timed(lambda: writer.submit("a", [(key_for(0), logits(0))] * 2))
            dropped = writer.submit("b", [(key_for(1), logits(1))] * 2)  # 4 values would be pending
            assert queued and not dropped and first_seconds < 0.01
            assert writer.wait(DEADLINE_SECONDS)  # the write fails within the socket timeout
        assert written == [("a", Outcome.FAILED, 2)]


# ---- a served fetch while the cache is frozen or gone ------------------------------------------------------


def test_frozen_redis_costs_a_served_fetch_one_short_timeout_then_nothing(engines, start_redis_server):
    server = start_redis_server()
    with (
        RedisStore(server.url) as service_store,
        RedisStore(server.url) as client_store,
        BackgroundServer(LocalBackend(engines), store=service_store) as service,
        TeacherClient(service.address, store=client_store, timeout_seconds=DEADLINE_SECONDS) as client,
    ):
        reference = engines["a"].infer(images(1), ["logits"])["logits"]
        healthy = [
            timed(lambda seed=seed: client.fetch(images(seed), ["a"], ["logits"]))[0] for seed in (1, 2)
        ]
        assert service.running.servicer.wait_for_cache_writes()
        with frozen(server):
            during = []
            for seed in range(3, 9):  # new images: the client misses, the service computes
                seconds, fetched = timed(lambda seed=seed: client.fetch(images(seed), ["a"], ["logits"]))
                during.append(seconds)
            cached_seconds, cached = timed(lambda: client.fetch(images(1), ["a"], ["logits"]))
            # The service answered from its teacher: the cache's values are out of reach.
            torch.testing.assert_close(cached["a"]["logits"], reference, rtol=2e-3, atol=1e-3)
            assert service.running.servicer.wait_for_cache_writes(1.0)  # nothing waits on the frozen server
        metric = service.running.metrics.registry.get_sample_value
        skipped = metric("ekd_cache_skipped_total", {"teacher": "a", "operation": "get"})
        failed = metric("ekd_cache_errors_total", {"teacher": "a", "operation": "get"}) - skipped
        assert client.stats.cache_unavailable == 8 * 7
        # One attempt on the frozen server each, by the client and by the service; the rest skipped it.
        assert client.store.stats.failures == 1 and client.store.stats.outages == 1
        assert failed == 1 and skipped == 6
    print(
        "served fetch of 8 images (compute included): healthy "
        + ", ".join(f"{s * 1000:.0f}" for s in healthy)
        + " ms; redis frozen: "
        + ", ".join(f"{s * 1000:.0f}" for s in during)
        + f" ms; a batch cached before the freeze: {cached_seconds * 1000:.0f} ms"
    )
    # The first fetch pays the client's read timeout and the service's, once each; the rest pay neither.
    assert 2 * DEFAULT_SOCKET_TIMEOUT_SECONDS <= during[0] < 2 * DEFAULT_SOCKET_TIMEOUT_SECONDS + 1.0
    assert statistics.median(during[1:]) < DEFAULT_SOCKET_TIMEOUT_SECONDS


def test_redis_killed_mid_use_then_restarted_on_the_same_port(engines, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="services.cache.guard")
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(running_redis_server(tmp_path / "redis-1"))
        port = int(first.url.rsplit(":", 1)[1].split("/")[0])
        service_guard = GuardedStore(
            stack.enter_context(RedisStore(first.url)), cooldown_seconds=COOLDOWN_SECONDS
        )
        client_guard = GuardedStore(
            stack.enter_context(RedisStore(first.url)), cooldown_seconds=COOLDOWN_SECONDS
        )
        service = stack.enter_context(BackgroundServer(LocalBackend(engines), store=service_guard))
        client = stack.enter_context(
            TeacherClient(service.address, store=client_guard, timeout_seconds=DEADLINE_SECONDS)
        )
        batch = images(20)
        expected = engines["a"].infer(batch, ["logits"])["logits"]
        client.fetch(batch, ["a"], ["logits"])
        assert service.running.servicer.wait_for_cache_writes()
        client.fetch(batch, ["a"], ["logits"])
        assert client.stats.cache_hits == 8

        first.process.kill()  # SIGKILL: no goodbye, the connections just break
        first.process.wait(timeout=DEADLINE_SECONDS)
        for _ in range(3):
            fetched = client.fetch(batch, ["a"], ["logits"])
            torch.testing.assert_close(fetched["a"]["logits"], expected, rtol=2e-3, atol=1e-3)
        assert client.stats.cache_unavailable == 3 * 8 and client.stats.cache_hits == 8
        assert client_guard.stats.outages == 1 and service_guard.stats.outages == 1
        assert len(guard_warnings(caplog)) == 2  # one for the client's guard, one for the service's

        stack.enter_context(running_redis_server(tmp_path / "redis-2", port=port))  # empty, same address

        def hits_again() -> bool:
            client.fetch(batch, ["a"], ["logits"])
            service.running.servicer.wait_for_cache_writes()
            return client.stats.cache_hits > 8

        assert wait_until(hits_again)
        assert client_guard.available and service_guard.available
        assert len(guard_warnings(caplog)) == 2
        with redis.Redis.from_url(first.url) as raw:
            assert raw.dbsize() == 8  # the service wrote the batch again into the new server
    metric = service.running.metrics.registry.get_sample_value
    assert metric("ekd_cache_errors_total", {"teacher": "a", "operation": "get"}) >= 1


def test_lmdb_errors_degrade_like_an_outage(tmp_path, engines):
    """A failing LMDB read (here: a closed environment's handle) is an outage for the guard, not a crash."""
    store = open_store(str(tmp_path / "cache"))
    guard = GuardedStore(store, cooldown_seconds=COOLDOWN_SECONDS)
    store._env.close()  # what a damaged file or a full readers table looks like from here: lmdb.Error
    lookup = guard.get_many([key_for(0)])
    assert lookup.outcome is Outcome.FAILED and guard.stats.outages == 1
    store._env = None  # closed already; the store's own close must not close it twice
