"""The cache on a real three-shard Redis Cluster (`redis-server --cluster-enabled yes`, made with
`redis-cli --cluster create`): values spread over every shard round-trip under HMAC with the same checks as
one Redis, `ekd cache stats` counts every shard, and a served distillation with one shard killed mid-run
degrades to misses and finishes as the undisturbed run does (same steps, losses and test accuracy)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import redis
import torch
from test_served_distill import KD, experiment, save_random_teachers, serve_teachers
from typer.testing import CliRunner

from services.cache import (
    CacheUnavailableError,
    CacheUnreachableError,
    OutputEntries,
    ValueSpec,
    guarded,
    open_store,
)
from services.cache.guard import Outcome
from services.cache.local_redis import CLUSTER_HIGHEST_PORT, RedisCluster, free_port
from services.cache.redis_cluster_store import RedisClusterStore, seed_nodes
from services.formats.codec import encode_value
from services.formats.soft_labels import compress
from trainer.cli.main import app
from trainer.config import ExperimentConfig
from trainer.runs.progress import ProgressUpdate
from trainer.runs.run import run_experiment

SECRET = b"a cluster's secret, 32 bytes...."
ENTRIES = OutputEntries.of("ab" * 32, "logits", "float16", logits_form="full")
COMPACT_ENTRIES = OutputEntries.of("ab" * 32, "logits", "float16", logits_form="compact")


def shard_sizes(cluster: RedisCluster) -> list[int]:
    sizes = []
    for shard in cluster.shards:
        client = redis.Redis.from_url(shard.url)
        sizes.append(client.dbsize())
        client.close()
    return sizes


def kill(shard) -> None:
    os.kill(shard.process.pid, signal.SIGKILL)
    shard.process.wait(timeout=5)


def test_a_cluster_node_gets_a_port_whose_bus_port_exists():
    # The ephemeral range reaches 60999 here, and a node on a port above 55535 refuses to start.
    assert all(free_port(CLUSTER_HIGHEST_PORT) <= CLUSTER_HIGHEST_PORT for _ in range(50))


def test_the_cluster_uri_names_its_nodes_credentials_and_query():
    url, others = seed_nodes("redis+cluster://:pw@10.0.0.1:7000,10.0.0.2:7001/?socket_timeout=1")
    assert url == "redis://:pw@10.0.0.1:7000/0?socket_timeout=1"
    assert [(node.host, node.port) for node in others] == [("10.0.0.2", 7001)]
    assert seed_nodes("rediss+cluster://h:7000")[0] == "rediss://h:7000/0"
    for bad in ("redis+cluster://h:7000/3", "redis+cluster://h:7000,h/", "redis+cluster://h:7000/?db=1"):
        with pytest.raises(ValueError, match="bad Redis"):
            RedisClusterStore(bad, ping_on_open=False)


def test_a_cluster_that_cannot_be_used_is_named_in_one_line(free_tcp_port, start_redis_server):
    with pytest.raises(CacheUnreachableError, match="cannot be connected"):
        RedisClusterStore(f"redis+cluster://127.0.0.1:{free_tcp_port}/")
    plain = start_redis_server().url.replace("redis://", "redis+cluster://").removesuffix("0")
    with pytest.raises(CacheUnavailableError, match="Cluster mode is not enabled"):
        open_store(plain)


def test_values_spread_over_every_shard_round_trip_and_stats_count_them_all(redis_cluster: RedisCluster):
    keys = ENTRIES.keys([index.to_bytes(16, "little") for index in range(300)])
    values = [torch.randn(10).half() for _ in keys]
    spec = [ValueSpec.full("float16", (10,))] * len(keys)
    with open_store(redis_cluster.url, hmac_key=SECRET) as store:
        assert isinstance(store, RedisClusterStore)
        store.put_many(list(zip(keys, values, strict=True)))
        assert all(size > 50 for size in shard_sizes(redis_cluster))  # every shard holds its share
        read = store.get_many(keys, expected=spec)
        assert all(torch.equal(got, want) for got, want in zip(read, values, strict=True))
        # A value planted without the secret, on whichever shard holds its key, is corrupt and deleted.
        planter = redis.cluster.RedisCluster.from_url(seed_nodes(redis_cluster.url)[0])
        planter.set(keys[7], encode_value(values[7]))
        assert store.get_many([keys[7]], expected=spec[:1]) == [None]
        assert planter.exists(keys[7]) == 0
        planter.close()
        # Compact entries, several to a hash bucket, spread over the shards by their buckets' slots too.
        compact_keys = COMPACT_ENTRIES.keys([index.to_bytes(16, "little") for index in range(300)])
        compact = compress(torch.randn(300, 10))
        store.put_many([(key, compact[row]) for row, key in enumerate(compact_keys)])
        read = store.get_many(compact_keys)
        assert all(torch.equal(got.top, compact[row].top) for row, got in enumerate(read))
        store.delete_many(compact_keys[:1])
        assert store.get_many(compact_keys[:2])[0] is None and len(dict(store.scan())) == 299 + 299
    stats = CliRunner().invoke(app, ["cache", "stats", redis_cluster.url])
    assert stats.exit_code == 0, stats.output
    assert "598 entries" in stats.output


def test_a_killed_shard_reads_as_an_outage_and_the_guard_answers_misses(redis_cluster: RedisCluster):
    keys = ENTRIES.keys([index.to_bytes(16, "little") for index in range(64)])
    with open_store(redis_cluster.url) as store:
        store.put_many([(key, torch.zeros(10).half()) for key in keys])
        kill(redis_cluster.shards[1])
        with pytest.raises(CacheUnreachableError, match="unavailable"):
            store.get_many(keys)
        with pytest.raises(CacheUnreachableError):
            store.ping()  # every primary is asked, so the breaker stays open while one is down
        guard = guarded(store)
        lookup = guard.get_many(keys)
        assert lookup.outcome is Outcome.FAILED and lookup.values == [None] * len(keys)
        assert guard.get_many(keys).outcome is Outcome.SKIPPED


@pytest.mark.slow
@pytest.mark.faults
def test_a_served_run_with_a_shard_killed_mid_run_ends_as_undisturbed(
    tmp_path: Path, redis_cluster: RedisCluster
):
    save_random_teachers(tmp_path)

    def served_run(name: str, on_progress=None):
        server, _ = serve_teachers(tmp_path, redis_cluster.url)
        with server:
            source = {"kind": "served", "address": server.address, "cache": redis_cluster.url}
            cfg = ExperimentConfig.model_validate(experiment(tmp_path, name, KD, teacher_source=source))
            return run_experiment(cfg, on_progress=on_progress)

    clean = served_run("clean")
    assert clean.counters["cache_hits"] > 0  # the second epoch replays the first one's views from the cluster
    for shard in redis_cluster.shards:
        client = redis.Redis.from_url(shard.url)
        client.flushall()
        client.close()
    killed: list[int] = []

    def kill_a_shard_in_the_second_epoch(update: ProgressUpdate) -> None:
        steps = clean.optimizer_steps // len(clean.history)
        if update.task == "shard-killed" and update.completed >= steps + 2 and not killed:
            kill(redis_cluster.shards[2])
            killed.append(update.completed)

    faulted = served_run("shard-killed", kill_a_shard_in_the_second_epoch)
    assert killed, "the run ended before the shard was killed"
    for name, run in (("undisturbed", clean), ("shard killed", faulted)):
        losses = ", ".join(f"{row['loss']:.6f}" for row in run.history)
        print(f"{name}: losses {losses}; test accuracy {run.test_accuracy:.4f}; {run.counters}")
    assert faulted.train_samples == clean.train_samples
    assert faulted.optimizer_steps == clean.optimizer_steps
    assert [row["loss"] for row in faulted.history] == pytest.approx([row["loss"] for row in clean.history])
    assert faulted.test_accuracy == clean.test_accuracy
    assert faulted.counters["cache_unavailable"] >= 1
