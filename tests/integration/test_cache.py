"""The teacher-output cache against real backends: LMDB in tmp_path and a real redis-server."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import lmdb
import pytest
import redis
import torch
import xxhash
from typer.testing import CliRunner

from services.cache import (
    QUANTIZED,
    CacheError,
    CacheFullError,
    CacheStats,
    CacheUnavailableError,
    KeyFields,
    ValueSpec,
    input_digest,
    input_digests,
    key_prefix,
    open_store,
    output_key,
    parse_key,
    teacher_tag,
)
from services.cache.inventory import inventory
from services.cache.layout import BUCKET_KEY_LENGTH, bucket_and_field
from services.cache.lmdb_store import LmdbStore
from services.cache.redis_store import RedisStore
from services.core.redaction import redact
from services.formats import quantized_logits
from services.formats.codec import encode_value
from services.formats.soft_labels import compress, encode
from trainer.cli.main import app

pytestmark = pytest.mark.integration


def image(seed: int, shape: tuple[int, ...] = (3, 16, 16)) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def key_for(seed: int, teacher: str = "resnet20@sha256:abc") -> bytes:
    return output_key(teacher, "logits", "float16", 0, input_digest(image(seed)))


def logits(seed: int, classes: int = 10) -> torch.Tensor:
    return torch.randn(classes, generator=torch.Generator().manual_seed(seed)).to(torch.float16)


# --- keys -------------------------------------------------------------------------------------------------


def test_input_digest_depends_on_exact_bytes_and_shape_not_layout():
    batch = torch.stack([image(0), image(1), image(0)])
    digests = input_digests(batch)
    assert digests == [input_digest(sample) for sample in batch]
    assert digests[0] == digests[2] != digests[1]
    assert all(len(digest) == 16 for digest in digests)
    channels_last = image(0).permute(1, 2, 0).contiguous().permute(2, 0, 1)  # same values, other strides
    assert input_digest(channels_last) == digests[0]
    one_byte_changed = image(0).clone()
    one_byte_changed[2, 15, 15] ^= 1
    assert input_digest(one_byte_changed) != digests[0]
    assert input_digest(image(0).reshape(3, 8, 32)) != digests[0]  # same buffer, other shape


def test_input_digest_rejects_anything_but_uint8_images():
    with pytest.raises(ValueError, match=r"uint8 \[B, C, H, W\] batch; got torch.float32"):
        input_digests(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"one uint8 \[C, H, W\] sample; got shape \(2, 3, 4, 4\)"):
        input_digest(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))


def test_output_key_differs_in_every_field_and_is_unambiguous():
    digest = input_digest(image(0))
    base = ("resnet20@sha256:abc", "logits", "float16", 0, digest)
    variants = [
        base,
        ("resnet20@sha256:abd", *base[1:]),
        (base[0], "layer3", *base[2:]),
        (*base[:2], "float32", *base[3:]),
        (*base[:3], 5, base[4]),
        (*base[:4], input_digest(image(1))),
        # Concatenation would make these two equal; length prefixes keep them apart.
        ("resnet20@sha256:ab", "clogits", *base[2:]),
        ("resnet20@sha256:abc", "logits", "float16", 0, digest),
    ]
    keys = [output_key(*fields) for fields in variants]
    assert len(set(keys)) == len(keys) - 1 and keys[0] == keys[-1]
    assert len({output_key(*base, form="compact"), output_key(*base)}) == 2
    # A prefix (namespace, teacher tag, output, form), then 12 bytes of the hash of every field.
    tag = xxhash.xxh3_64_hexdigest(b"resnet20@sha256:abc")[:12]
    assert keys[0] == key_prefix(tag, "logits", "f16") + keys[0][-12:] and len(keys[0]) == 22
    assert keys[3].startswith(key_prefix(tag, "logits", "f32"))
    assert keys[4].startswith(key_prefix(tag, "logits", "top5.f16"))
    assert output_key(*base, form="compact").startswith(key_prefix(tag, "logits", "compact"))
    assert parse_key(keys[2]) == KeyFields(tag, "layer3", "f16")
    assert parse_key(keys[4]) == KeyFields(tag, "logits", "top5.f16")
    sha_identity = "ab" * 32
    assert output_key(sha_identity, *base[1:]).startswith(b"e\x03" + b"\xab" * 6 + b"\x00\x03")


def test_output_key_names_bad_fields():
    digest = input_digest(image(0))
    with pytest.raises(ValueError, match="teacher_identity"):
        output_key("", "logits", "float16", 0, digest)
    with pytest.raises(ValueError, match="output"):
        output_key("t", "", "float16", 0, digest)
    with pytest.raises(ValueError, match=r"unknown dtype 'fp16'; allowed: float32, float16"):
        output_key("t", "logits", "fp16", 0, digest)
    with pytest.raises(ValueError, match=r"top_k must be a non-negative int; got -1"):
        output_key("t", "logits", "float16", -1, digest)
    with pytest.raises(ValueError, match="16-byte"):
        output_key("t", "logits", "float16", 0, digest[:8])
    with pytest.raises(ValueError, match="1 to 255 bytes"):
        output_key("t", "a" * 256, "float16", 0, digest)
    with pytest.raises(ValueError, match="top_k must be 0, got 5"):
        output_key("t", "logits", "float16", 5, digest, form="compact")


KEY_PROGRAM = """
import torch
from services.cache import input_digests, output_key
batch = torch.arange(2 * 3 * 16 * 16, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(2, 3, 16, 16)
print(output_key("resnet20@sha256:abc", "logits", "float16", 5, input_digests(batch)[1]).hex())
"""


def test_keys_are_identical_across_processes():
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", KEY_PROGRAM],
            env={**os.environ, "PYTHONHASHSEED": seed},
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in ("1", "2")
    ]
    outputs = [process.communicate(timeout=120)[0].strip() for process in processes]
    assert [process.returncode for process in processes] == [0, 0]
    batch = torch.arange(2 * 3 * 16 * 16).remainder(251).to(torch.uint8).reshape(2, 3, 16, 16)
    expected = output_key("resnet20@sha256:abc", "logits", "float16", 5, input_digest(batch[1])).hex()
    assert outputs == [expected, expected]


# --- behaviour every backend shares ------------------------------------------------------------------------


class LmdbBackend:
    def __init__(self, path: Path) -> None:
        self.path = path

    def open(self) -> LmdbStore:
        return LmdbStore(self.path, map_size=2**24)

    def write_raw(self, key: bytes, value: bytes) -> None:
        """Write bytes under a key behind the store's back; the store must be closed (one env per process)."""
        with lmdb.open(str(self.path), map_size=2**24) as env, env.begin(write=True) as txn:
            txn.put(key, value)


class RedisBackend:
    def __init__(self, url: str) -> None:
        self.url = url

    def open(self) -> RedisStore:
        return RedisStore(self.url)

    def write_raw(self, key: bytes, value: bytes) -> None:
        with redis.Redis.from_url(self.url) as client:
            place = bucket_and_field(key)
            client.set(key, value) if place is None else client.hset(place[0], place[1], value)


@pytest.fixture(params=["lmdb", "redis"])
def backend(request, tmp_path):
    if request.param == "lmdb":
        return LmdbBackend(tmp_path / "cache")
    return RedisBackend(request.getfixturevalue("redis_url"))


@pytest.fixture
def teacher(request) -> str:
    """A teacher identity of this test's own, so tests sharing the session's redis-server never share keys."""
    return f"test-teacher:{request.node.nodeid}"


def test_put_and_get_many_in_order_with_hits_and_misses(backend, teacher):
    seeds = [0, 1, 2, 3]
    keys = [key_for(seed, teacher) for seed in seeds]
    with backend.open() as store:
        assert store.get_many([]) == []
        store.put_many([])
        store.put_many([(keys[0], logits(seeds[0])), (keys[2], logits(seeds[2]))])
        values = store.get_many([keys[3], keys[2], keys[1], keys[0]])
        assert values[0] is None and values[2] is None
        assert torch.equal(values[1], logits(seeds[2])) and torch.equal(values[3], logits(seeds[0]))
        assert values[1].dtype == torch.float16
        encoded_size = len(encode_value(logits(0)))
        assert store.stats == CacheStats(
            hits=2, misses=2, corrupt=0, puts=2, bytes_read=2 * encoded_size, bytes_written=2 * encoded_size
        )


def test_put_overwrites_and_values_persist_after_reopening(backend, teacher):
    seed = 0
    key = key_for(seed, teacher)
    with backend.open() as store:
        store.put_many([(key, logits(seed))])
        store.put_many([(key, torch.arange(4, dtype=torch.float32))])
    with backend.open() as store:
        assert store.get_many([key])[0].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_corrupt_values_are_misses_counted_deleted_then_replaced(backend, teacher):
    seeds = [0, 1, 2]
    good, garbage, truncated = (key_for(seed, teacher) for seed in seeds)
    with backend.open() as store:
        store.put_many([(good, logits(seeds[0]))])
    backend.write_raw(garbage, b"not a tensor at all")
    backend.write_raw(truncated, encode_value(logits(seeds[2]))[:-3])
    with backend.open() as store:
        values = store.get_many([garbage, good, truncated])
        assert values[0] is None and values[2] is None
        assert torch.equal(values[1], logits(seeds[0]))
        assert (store.stats.hits, store.stats.misses, store.stats.corrupt) == (1, 2, 2)
        # Deleted on sight: a second read is a plain miss, not another corrupt value.
        assert store.get_many([garbage, truncated]) == [None, None]
        assert (store.stats.misses, store.stats.corrupt) == (4, 2)
        store.put_many([(garbage, logits(seeds[1]))])
        assert torch.equal(store.get_many([garbage])[0], logits(seeds[1]))


def test_keys_must_be_bytes(backend):
    with (
        backend.open() as store,
        pytest.raises(TypeError, match="cache keys are bytes from output_key; got str"),
    ):
        store.get_many(["ekd:v2:abc"])


def test_stats_stay_exact_under_concurrent_readers(tmp_path):
    key = key_for(0)
    with LmdbStore(tmp_path / "cache", map_size=2**24) as store:
        store.put_many([(key, logits(0))])

        def read() -> None:
            for _ in range(25):
                store.get_many([key, b"ekd:v2:absent"])

        threads = [threading.Thread(target=read) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert (store.stats.hits, store.stats.misses) == (100, 100)


# --- LMDB ------------------------------------------------------------------------------------------------

READER_PROGRAM = """
import sys
from services.cache import open_store
with open_store("lmdb://" + sys.argv[1], readonly=True) as store:
    for value in store.get_many([bytes.fromhex(key) for key in sys.argv[2:]]):
        print(None if value is None else value.tolist())
"""


def test_lmdb_is_readable_from_another_process_while_open_for_writing(tmp_path):
    keys = [key_for(0), key_for(1)]
    with LmdbStore(tmp_path / "cache", map_size=2**24) as store:
        store.put_many([(keys[0], torch.tensor([1.5, -2.0], dtype=torch.float16))])
        reader = subprocess.run(
            [sys.executable, "-c", READER_PROGRAM, str(tmp_path / "cache"), *(key.hex() for key in keys)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert reader.returncode == 0, reader.stderr
    assert reader.stdout.splitlines() == ["[1.5, -2.0]", "None"]


def test_lmdb_full_map_says_to_raise_map_size(tmp_path):
    with LmdbStore(tmp_path / "cache", map_size=2**16) as store:
        with pytest.raises(CacheFullError, match=r"is full \(map_size=65536 bytes\).*map_size=131072"):
            store.put_many([(key_for(0), torch.zeros(2**16, dtype=torch.uint8))])
        store.put_many([(key_for(1), logits(1))])  # the failed write left the store usable
        assert torch.equal(store.get_many([key_for(1)])[0], logits(1))


def test_lmdb_readonly_refuses_writes_and_missing_dir_is_unavailable(tmp_path):
    with LmdbStore(tmp_path / "nested" / "cache"):
        pass
    with (
        LmdbStore(tmp_path / "nested" / "cache", readonly=True) as store,
        pytest.raises(CacheError, match="read-only; reopen with readonly=False"),
    ):
        store.put_many([(key_for(0), logits(0))])
    with pytest.raises(CacheUnavailableError, match=r"cannot open LMDB cache at .*absent"):
        LmdbStore(tmp_path / "absent", readonly=True)


# --- Redis -----------------------------------------------------------------------------------------------


def test_redis_ttl_and_key_prefix(redis_url, teacher):
    seeds = [0, 1]
    keys = [key_for(seed, teacher) for seed in seeds]
    with redis.Redis.from_url(redis_url) as raw:
        with RedisStore(redis_url, ttl_seconds=600, key_prefix="exp7:") as store:
            store.put_many([(key, logits(seed)) for key, seed in zip(keys, seeds)])
        assert [raw.exists(key) for key in keys] == [0, 0]
        assert all(0 < raw.ttl(b"exp7:" + key) <= 600 for key in keys)
        with RedisStore(redis_url) as store:
            store.put_many([(keys[0], logits(seeds[0]))])
        assert raw.ttl(keys[0]) == -1  # no TTL: kept until evicted


def test_redis_keeps_compact_entries_several_to_a_compact_hash(redis_url, teacher):
    """Compact entries live in hash buckets of Redis's listpack encoding: found, scanned, sized, expired and
    deleted like keys of their own, at under 100 bytes each all-in where a bucket holds a few hundred."""
    identity = xxhash.xxh3_128_hexdigest(teacher.encode())
    first = output_key(identity, "logits", "float16", 0, input_digest(image(0)), form="compact")
    # 300 keys of one bucket (the hash's first bytes fixed), as ImageNet's 20 M views of a teacher fill each.
    keys = [
        first[:BUCKET_KEY_LENGTH] + random.Random(i).randbytes(len(first) - BUCKET_KEY_LENGTH)
        for i in range(300)
    ]
    compact = compress(torch.randn(300, 1000, generator=torch.Generator().manual_seed(0)) * 3)
    bucket = b"exp8:" + first[:BUCKET_KEY_LENGTH]
    with (
        redis.Redis.from_url(redis_url) as raw,
        RedisStore(redis_url, ttl_seconds=600, key_prefix="exp8:") as store,
    ):
        store.put_many([(key, compact[row]) for row, key in enumerate(keys)])
        assert raw.type(bucket) == b"hash" and raw.hlen(bucket) == 300
        assert raw.object("encoding", bucket) == b"listpack" and 0 < raw.ttl(bucket) <= 600
        assert all(raw.exists(b"exp8:" + key) == 0 for key in keys[:5])
        found = store.get_many(keys[::-1])
        assert all(torch.equal(f.top, compact[row].top) for f, row in zip(found, range(299, -1, -1)))
        assert dict(store.scan(key_prefix(identity[:12]))) == {key: 63 for key in keys}
        (per_entry,) = store.entry_bytes([list(store.scan())])
        assert 63 + 10 < per_entry < 100  # the value, its field (the key's last 10 bytes) and a few
        store.delete_many(keys[:100])
        assert raw.hlen(bucket) == 200 and store.get_many(keys[:2]) == [None, None]
        store.delete_many(keys[100:])
        assert raw.exists(bucket) == 0  # Redis drops an emptied hash


def test_redis_ttl_must_be_positive(redis_url):
    with pytest.raises(ValueError, match=r"ttl_seconds must be a positive int or None; got 0"):
        RedisStore(redis_url, ttl_seconds=0)


def test_redis_eviction_turns_entries_into_misses(start_redis_server):
    server = start_redis_server("--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru")
    keys = [key_for(seed) for seed in range(200)]
    value = torch.zeros(8192, dtype=torch.float16)  # 16 KiB; 200 of them are well past 2 MB
    with RedisStore(server.url) as store:
        for start in range(0, len(keys), 10):
            store.put_many([(key, value + start) for key in keys[start : start + 10]])
        values = store.get_many(keys)
    with redis.Redis.from_url(server.url) as raw:
        assert raw.info("stats")["evicted_keys"] > 0
    hits = [index for index, cached in enumerate(values) if cached is not None]
    assert 0 < len(hits) < len(keys)
    assert all(torch.equal(values[index], value + index // 10 * 10) for index in hits)
    assert store.stats.misses == len(keys) - len(hits) and store.stats.corrupt == 0


def test_redis_down_is_unavailable_with_redacted_url(free_tcp_port):
    port = free_tcp_port
    redacted = rf"redis://:\*\*\*@127.0.0.1:{port}/0"
    with pytest.raises(CacheUnavailableError, match=rf"Redis cache at {redacted} is unavailable") as caught:
        RedisStore(f"redis://:s3cret@127.0.0.1:{port}/0")
    assert "s3cret" not in str(caught.value)


def test_redis_server_going_away_is_unavailable(start_redis_server):
    server = start_redis_server()
    with RedisStore(server.url) as store:
        store.put_many([(key_for(0), logits(0))])
        server.stop()
        with pytest.raises(CacheUnavailableError, match=f"Redis cache at {server.url} is unavailable"):
            store.get_many([key_for(0)])
        with pytest.raises(CacheUnavailableError):
            store.put_many([(key_for(0), logits(0))])


def test_redis_out_of_memory_without_eviction_is_cache_full(start_redis_server):
    server = start_redis_server("--maxmemory", "1mb", "--maxmemory-policy", "noeviction")
    with (
        RedisStore(server.url) as store,
        pytest.raises(CacheFullError, match="set maxmemory-policy to allkeys-lru"),
    ):
        for seed in range(100):
            store.put_many([(key_for(seed), torch.zeros(16384, dtype=torch.uint8))])


# --- open_store -----------------------------------------------------------------------------------------


def test_open_store_picks_the_backend_from_the_uri(tmp_path, redis_url, monkeypatch):
    with open_store(f"lmdb://{tmp_path}/a", map_size=2**20) as store:
        assert isinstance(store, LmdbStore) and store.path == tmp_path / "a" and store.map_size == 2**20
    with open_store(str(tmp_path / "b")) as store:
        assert isinstance(store, LmdbStore) and store.path == tmp_path / "b"
    monkeypatch.chdir(tmp_path)
    with open_store("relative/c") as store:
        assert isinstance(store, LmdbStore) and (tmp_path / "relative" / "c" / "data.mdb").exists()
    with open_store(redis_url, ttl_seconds=30) as store:
        assert isinstance(store, RedisStore) and store.ttl_seconds == 30


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "empty cache URI; allowed forms: lmdb:///absolute/path"),
        (
            "s3://bucket/cache",
            r"unsupported cache URI 's3://bucket/cache'; allowed forms: lmdb:///absolute/path, "
            r"a plain filesystem path, redis://\[:password@\]host:port/db",
        ),
        ("memcached://:pw@host:1/0", r"unsupported cache URI 'memcached://:\*\*\*@host:1/0'"),
        ("lmdb://relative/path", "use lmdb:///absolute/path"),
        ("redis://:pw@host:notaport/0", r"bad Redis cache URL 'redis://:\*\*\*@host:notaport/0'"),
    ],
)
def test_open_store_rejects_other_uris(uri, message):
    with pytest.raises(ValueError, match=message) as caught:
        open_store(uri)
    assert ":pw@" not in str(caught.value)


def test_lmdb_stores_on_one_directory_share_it_within_a_process(tmp_path):
    """LMDB allows one environment per directory per process: a service and a client side by side share it."""
    first, second = LmdbStore(tmp_path / "shared"), LmdbStore(tmp_path / "shared")
    key = output_key("teacher", "logits", "float16", 0, input_digest(torch.zeros(3, 2, 2, dtype=torch.uint8)))
    first.put_many([(key, torch.ones(4, dtype=torch.float16))])
    first.close()
    assert torch.equal(second.get_many([key])[0], torch.ones(4, dtype=torch.float16))
    second.close()
    with LmdbStore(tmp_path / "shared") as reopened:
        assert reopened.get_many([key])[0] is not None


def test_compact_values_round_trip_and_damage_reads_as_a_miss(backend):
    compact = compress(torch.randn(3, 1000, generator=torch.Generator().manual_seed(0)) * 3)
    keys = [
        output_key("teacher", "logits", "float16", 0, input_digest(image(i)), form="compact")
        for i in range(3)
    ]
    with backend.open() as store:
        store.put_many([(key, compact[i]) for i, key in enumerate(keys)])
        read = store.get_many(keys)
        assert all(torch.equal(value.indices, compact[i].indices) for i, value in enumerate(read))
        assert store.stats.bytes_written == 3 * 63
        damaged = bytearray(encode(compact[0])[0])
        damaged[-7] ^= 0x10
        store._put_raw([(keys[0], bytes(damaged)), (keys[1], encode(compact[1])[0][:40])])
        assert store.get_many(keys)[:2] == [None, None]
        assert store.stats.corrupt == 2


def test_scan_counts_entries_per_prefix_without_reading_values_and_delete_drops_them(backend, teacher):
    # Hex identities of this test's own (the session's redis-server is shared), so their tags are readable.
    first, second = (xxhash.xxh3_128_hexdigest(f"{teacher}:{n}".encode()) for n in (1, 2))
    with backend.open() as store:
        full = [output_key(first, "logits", "float16", 0, input_digest(image(i))) for i in range(4)]
        compact = [
            output_key(first, "logits", "float16", 0, input_digest(image(i)), form="compact")
            for i in range(2)
        ]
        other = [output_key(second, "layer3", "float16", 0, input_digest(image(i))) for i in range(3)]
        store.put_many([(key, logits(i)) for i, key in enumerate(full + other)])
        store.put_many([(key, compress(logits(i).unsqueeze(0).float())) for i, key in enumerate(compact)])
        sizes = dict(store.scan())
        assert set(full + compact + other) <= set(sizes)
        assert {sizes[key] for key in compact} == {39}  # 10 classes, all kept
        assert sorted(dict(store.scan(key_prefix(first[:12], "logits", "compact")))) == sorted(compact)
        assert sorted(dict(store.scan(key_prefix(first[:12])))) == sorted(full + compact)
        assert len(dict(store.scan(key_prefix(second[:12])))) == 3
        store.delete_many(other)
        assert dict(store.scan(key_prefix(second[:12]))) == {}


def test_a_refused_redis_password_is_one_line_naming_the_store(start_redis_server):
    server = start_redis_server()
    with redis.Redis.from_url(server.url) as client:
        client.config_set("requirepass", "right")
    wrong = server.url.replace("redis://", "redis://:wrong@")
    with pytest.raises(
        CacheUnavailableError, match=r"Redis cache at redis://:\*\*\*@127.0.0.1:\d+/0 refuses the"
    ):
        open_store(wrong)
    with pytest.raises(CacheUnavailableError, match="refuses the password"):
        open_store(server.url)


def test_get_many_checks_each_value_against_what_its_key_expects(backend, teacher):
    full = [key_for(seed, teacher) for seed in range(4)]
    compact_key = output_key(teacher, "logits", "float16", 0, input_digest(image(9)), form="compact")
    compact = compress(torch.randn(1, 10, generator=torch.Generator().manual_seed(0)))
    with backend.open() as store:
        store.put_many(
            [
                (full[0], logits(0)),
                (full[1], logits(1).float()),  # float32 under an fp16 key
                (full[2], torch.zeros(2, 5, dtype=torch.float16)),  # the right size, the wrong shape
                (full[3], compact[0]),  # the compact form under a full key
                (compact_key, compact[0]),
            ]
        )
        logits_spec = ValueSpec.full("float16", (10,))
        keys = [*full, compact_key]
        with pytest.raises(ValueError, match="one ValueSpec per key: 1 for 5 keys"):
            store.get_many(keys, [logits_spec])
        values = store.get_many(keys, [logits_spec] * 4 + [ValueSpec.compact(100)])  # 10 classes stored
        assert torch.equal(values[0], logits(0)) and values[1:] == [None] * 4
        assert store.stats.corrupt == 4
        assert store.get_many(keys)[1:] == [None] * 4  # deleted on sight
        store.put_many([(compact_key, compact[0])])
        assert store.get_many([compact_key], [ValueSpec.compact(10)])[0].num_classes == 10
        # A frame of another size (fewer entries than this version keeps) would not stack with the others.
        store.put_many([(compact_key, compress(torch.randn(1, 10), entries=8))])
        assert store.get_many([compact_key], [ValueSpec.compact(10)]) == [None]


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
        (
            "rediss://user:pw@h:1/0?ssl_ca_certs=/etc/ca.pem",
            "rediss://user:***@h:1/0?ssl_ca_certs=/etc/ca.pem",
        ),
        ("redis://h:1/0?password=pw&socket_timeout=1", "redis://h:1/0?password=***&socket_timeout=1"),
        ("redis://h:1/0?ssl_password=pw&auth_token=t", "redis://h:1/0?ssl_password=***&auth_token=***"),
    ],
)
def test_redact_url_hides_passwords_in_the_user_info_and_the_query(url, redacted):
    assert redact(url) == redacted


def test_redis_urls_accept_only_known_query_parameters(redis_url):
    with pytest.raises(
        ValueError, match=r"unknown query parameters \['password'\]; allowed: socket_timeout"
    ) as bad:
        open_store(redis_url + "?password=s3cret")
    assert "s3cret" not in str(bad.value) and "password=***" in str(bad.value)
    with open_store(redis_url + "?socket_timeout=2&socket_connect_timeout=1") as store:
        pool = store._client.connection_pool.connection_kwargs
        assert (pool["socket_timeout"], pool["socket_connect_timeout"]) == (2.0, 1.0)
    with open_store(redis_url) as store:
        pool = store._client.connection_pool.connection_kwargs
        assert (pool["socket_timeout"], pool["socket_connect_timeout"]) == (0.25, 0.5)


def test_lmdb_errors_are_cache_errors(tmp_path):
    store = LmdbStore(tmp_path / "cache", map_size=2**24)
    store._env.close()  # what a damaged file looks like from here: every operation raises lmdb.Error
    try:
        with pytest.raises(CacheError, match=r"LMDB cache at .*cache failed: Error"):
            store.get_many([key_for(0)])
        with pytest.raises(CacheError, match=r"LMDB cache at .*cache failed"):
            store.put_many([(key_for(0), logits(0))])
    finally:
        store.close()


def test_quantized_values_round_trip_and_stats_count_each_entry_all_in(backend, teacher):
    raw = torch.randn(300, 1000, generator=torch.Generator().manual_seed(0)) * 3
    keys = [
        output_key(teacher, "logits", "float16", 0, input_digest(image(i)), form=QUANTIZED)
        for i in range(300)
    ]
    fp16_keys = [output_key(teacher, "logits", "float16", 0, input_digest(image(i))) for i in range(300)]
    with backend.open() as store:
        store.put_many(list(zip(keys, raw, strict=True)) + list(zip(fp16_keys, raw.half(), strict=True)))
        found = store.get_many(
            keys, [ValueSpec.of(QUANTIZED, "float16", num_classes=1000, shape=(1000,))] * 300
        )
        assert torch.equal(torch.stack(found), quantized_logits.quantized(raw))
        # A full frame under a quantized key (or the reverse) is the wrong kind: a miss, deleted.
        store._put_raw([(keys[0], encode_value(raw[0])), (fp16_keys[0], quantized_logits.encode(raw[:1])[0])])
        assert store.get_many([keys[0], fp16_keys[0]]) == [None, None]
        groups = {group.form: group for group in inventory(store)[0] if group.tag == teacher_tag(teacher)}
    quantized_group, fp16_group = groups["quantized"], groups["f16"]
    assert (quantized_group.entries, fp16_group.entries) == (299, 299)
    # fp16 logits are framed in byte planes (2,027 bytes raw): a 1000-class value fits an LMDB leaf page.
    assert quantized_group.bytes_per_entry == 22 + 910 and fp16_group.bytes_per_entry < 22 + 1800
    # All-in: more than the key and value, and within what the backend could plausibly spend; an fp16 value
    # stays on the leaf pages (no 4 KiB overflow page of its own), at most two to a page.
    for group in (quantized_group, fp16_group):
        assert group.all_in_bytes is not None
        assert group.bytes_per_entry < group.all_in_bytes < 2.5 * group.bytes_per_entry
    if isinstance(backend, LmdbBackend):
        assert 2048 <= fp16_group.all_in_bytes < 4096


def test_ekd_cache_pack_copies_an_lmdb_bank_in_key_order_into_fuller_pages(tmp_path):
    raw = torch.randn(3000, 100, generator=torch.Generator().manual_seed(0))
    keys = [
        output_key("ab" * 32, "logits", "float16", 0, random.Random(i).randbytes(16), form="compact")
        for i in range(3000)
    ]
    with LmdbStore(tmp_path / "bank") as store:
        for start in range(0, 3000, 500):  # in hash order, as a bank is written
            compact = compress(raw[start : start + 500])
            store.put_many([(keys[start + row], compact[row]) for row in range(500)])
        written = store.entry_bytes([list(store.scan())])
    result = CliRunner().invoke(app, ["cache", "pack", str(tmp_path / "bank"), str(tmp_path / "packed")])
    assert result.exit_code == 0 and "packed 3,000 entries" in result.output
    with LmdbStore(tmp_path / "packed", readonly=True) as packed, LmdbStore(tmp_path / "bank") as store:
        assert [encode(v)[0] for v in packed.get_many(keys)] == [encode(v)[0] for v in store.get_many(keys)]
        assert packed.entry_bytes([list(packed.scan())])[0] < 0.85 * written[0]
    refused = CliRunner().invoke(app, ["cache", "pack", str(tmp_path / "bank"), str(tmp_path / "packed")])
    assert refused.exit_code != 0 and "not empty" in refused.output
