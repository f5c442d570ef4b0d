"""The production teacher-output store: a Redis server shared by every trainer and teacher host (or a Redis
Cluster: `services.cache.redis_cluster_store`, on the same code).

Reads are one MGET, writes one non-transactional pipeline of SETs. Compact-form entries, whose values are
smaller than a Redis key's own overhead, live several to a hash instead (`services.cache.layout`'s buckets:
pipelined HGET, HSET, HDEL): run the server with `hash-max-listpack-entries 512` and `hash-max-listpack-value
128` so that those hashes keep Redis's compact encoding (an HMAC-tagged 1000-class compact frame is 79
bytes). Run it with `maxmemory` and an eviction policy such as `allkeys-lru`: an evicted entry (or bucket) is
simply a miss. Under `noeviction` a full server refuses writes, which surfaces as CacheFullError. A TTL
counts from the last write to a bucket for its entries.

Timeouts are short, so that a frozen or unreachable server costs a caller a fraction of a second, not the
5 s socket defaults: 0.5 s to connect, 0.25 s for each socket read (a reply, not the whole transfer: a large
MGET keeps its socket busy and never waits that long between reads; from a local server, 512 fp16 1000-class
logits, 1 MiB, take 5 ms, and 64 fp16 [256, 14, 14] feature maps, 6 MiB, 11 ms). A timeout is not retried
(that would double it); a connection error is retried once at once, which recovers a pooled connection the
server closed. Tune them in the URL's query, which wins over the constructor:
`redis://host:6379/0?socket_timeout=1&socket_connect_timeout=2`.

TLS: `rediss://host:6380/0?ssl_ca_certs=/etc/ekd/redis-ca.pem` verifies the server's certificate against that
CA file (its host name too, unless `ssl_check_hostname=false`); `ssl_certfile` and `ssl_keyfile` add a client
certificate for servers that ask for one. Only the query parameters in `ALLOWED_QUERY` are accepted: nothing
secret belongs in a URL's query (the password goes in its user info, redacted from every message).
"""

from __future__ import annotations

import ssl
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import islice
from typing import cast
from urllib.parse import parse_qsl, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import OutOfMemoryError, RedisClusterException, RedisClusterUnreachableError
from redis.retry import Retry

from services.cache.layout import BUCKET_KEY_LENGTH, bucket_and_field, is_bucket
from services.cache.store import (
    CacheError,
    CacheFullError,
    CacheUnavailableError,
    CacheUnreachableError,
    TeacherOutputStore,
)
from services.core.redaction import redact

_SCAN_STEP = 1000
DEFAULT_CONNECT_TIMEOUT_SECONDS = 0.5
DEFAULT_SOCKET_TIMEOUT_SECONDS = 0.25
ALLOWED_QUERY = (
    "socket_timeout",
    "socket_connect_timeout",
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
    "ssl_check_hostname",
    "health_check_interval",
)


def _glob_escaped(text: bytes) -> bytes:
    """`text` with Redis glob's special characters escaped, to match literally in SCAN MATCH."""
    for special in (b"\\", b"*", b"?", b"[", b"]"):
        text = text.replace(special, b"\\" + special)
    return text


def checked_query(url: str, redacted: str) -> None:
    """ValueError unless every query parameter of `url` is one of `ALLOWED_QUERY`."""
    unknown = sorted({name for name, _ in parse_qsl(urlsplit(url).query)} - set(ALLOWED_QUERY))
    if unknown:
        raise ValueError(
            f"bad Redis cache URL {redacted!r}: unknown query parameters {unknown}; "
            f"allowed: {', '.join(ALLOWED_QUERY)}"
        )


def connection_retry() -> Retry:
    """One immediate retry recovers a pooled connection the server closed; more would only delay the error
    when the server is really down. Timeouts are not retried: that would double them."""
    return Retry(NoBackoff(), retries=1, supported_errors=(redis.ConnectionError,))


class RedisBackedStore(TeacherOutputStore):
    """What one Redis and a Redis Cluster share: whole-value SETs in a non-transactional pipeline, DEL, SCAN
    of each server, the errors as cache errors. A subclass gives the client, its multi-get, its ping and the
    servers a scan walks.

    `ttl_seconds` expires entries that long after their last write (None: kept until evicted); `key_prefix`
    namespaces this store's keys on a shared server; `hmac_key` authenticates values (`TeacherOutputStore`).
    """

    def __init__(self, url: str, ttl_seconds: int | None, key_prefix: str, hmac_key: bytes | None) -> None:
        super().__init__(hmac_key)
        if ttl_seconds is not None and (
            isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or ttl_seconds <= 0
        ):
            raise ValueError(f"ttl_seconds must be a positive int or None; got {ttl_seconds!r}")
        self.url = redact(url)
        self.ttl_seconds = ttl_seconds
        self._prefix = key_prefix.encode()
        checked_query(url, self.url)

    @property
    @abstractmethod
    def _client(self) -> redis.Redis | RedisCluster:
        """The client every command but the multi-get and the scan goes through."""

    @abstractmethod
    def _get_prefixed(self, keys: list[bytes]) -> list[bytes | None]:
        """The values of the (prefixed) keys, in order; None where absent."""

    @abstractmethod
    def _scanned_servers(self) -> list[redis.Redis]:
        """A client of each server whose keys a scan walks: every primary."""

    @contextmanager
    def _translated_errors(self) -> Iterator[None]:
        try:
            yield
        except redis.AuthenticationError as error:
            raise self._refused_password(error) from error
        except RedisClusterUnreachableError as error:
            raise CacheUnreachableError(f"Redis cache at {self.url} is unavailable: {error}") from error
        except RedisClusterException as error:
            # A cluster client wraps what the nodes it asked for the slot map said.
            if isinstance(error.__cause__, redis.AuthenticationError):
                raise self._refused_password(error.__cause__) from error
            raise CacheUnavailableError(f"Redis cache at {self.url} cannot be used: {error}") from error
        except (redis.ConnectionError, redis.TimeoutError) as error:
            # A TLS handshake that fails (an untrusted certificate) is a configuration error, not an outage.
            failed = (
                CacheUnavailableError
                if isinstance(error.__context__, ssl.SSLError)
                else CacheUnreachableError
            )
            raise failed(f"Redis cache at {self.url} is unavailable: {error}") from error
        except OutOfMemoryError as error:
            raise CacheFullError(
                f"Redis cache at {self.url} is out of memory and refuses writes ({error}); "
                "set maxmemory-policy to allkeys-lru so old entries are evicted, or raise maxmemory"
            ) from error
        except redis.RedisError as error:
            raise CacheError(f"Redis cache at {self.url} failed: {error}") from error

    def _refused_password(self, error: redis.AuthenticationError) -> CacheUnavailableError:
        return CacheUnavailableError(
            f"Redis cache at {self.url} refuses the password ({error}); give the right one in the URL: "
            "redis://:PASSWORD@host:port/db"
        )

    def _get_raw(self, keys: list[bytes]) -> list[bytes | None]:
        values: list[bytes | None] = [None] * len(keys)
        named = [index for index, key in enumerate(keys) if bucket_and_field(key) is None]
        in_buckets = [(index, place) for index, key in enumerate(keys) if (place := bucket_and_field(key))]
        with self._translated_errors():
            if named:
                found = self._get_prefixed([self._prefix + keys[index] for index in named])
                for index, value in zip(named, found, strict=True):
                    values[index] = value
            if in_buckets:
                pipeline = self._client.pipeline(transaction=False)
                for _, (bucket, field) in in_buckets:
                    pipeline.hget(self._prefix + bucket, field)
                for (index, _), value in zip(in_buckets, pipeline.execute(), strict=True):
                    values[index] = value
        return values

    def _put_raw(self, items: list[tuple[bytes, bytes]]) -> None:
        with self._translated_errors():
            pipeline = self._client.pipeline(transaction=False)
            for key, value in items:
                place = bucket_and_field(key)
                if place is None:
                    pipeline.set(self._prefix + key, value, ex=self.ttl_seconds)
                    continue
                bucket = self._prefix + place[0]
                pipeline.hset(bucket, place[1], value)
                if self.ttl_seconds is not None:
                    pipeline.expire(bucket, self.ttl_seconds)
            pipeline.execute()

    def _scan_raw(self, prefix: bytes) -> Iterator[tuple[bytes, int]]:
        # SCAN MATCH walks each server's keyspace in steps without blocking it; STRLEN, pipelined per step,
        # gives each value's size without sending it. A bucket's entries come from HSCAN (compact values are
        # small: reading them costs little more than their sizes would).
        pattern = _glob_escaped(self._prefix + prefix[:BUCKET_KEY_LENGTH]) + b"*"
        with self._translated_errors():
            for server in self._scanned_servers():
                names = server.scan_iter(match=pattern, count=_SCAN_STEP)
                while step := [name[len(self._prefix) :] for name in islice(names, _SCAN_STEP)]:
                    keys = [name for name in step if not is_bucket(name)]
                    pipeline = server.pipeline(transaction=False)
                    for key in keys:
                        pipeline.strlen(self._prefix + key)
                    sizes = zip(keys, pipeline.execute(), strict=True)
                    for key, size in sizes:
                        if size and key.startswith(prefix):  # 0: expired or evicted since the scan saw it
                            yield key, size
                    for bucket in (name for name in step if is_bucket(name)):
                        for field, value in server.hscan_iter(self._prefix + bucket, count=_SCAN_STEP):
                            if (bucket + field).startswith(prefix):
                                yield bucket + field, len(value)

    def entry_bytes(self, groups: Sequence[Sequence[tuple[bytes, int]]]) -> list[float] | None:
        # MEMORY USAGE: the server's own count of a key's allocations (entry, key, value object and value),
        # less the hash table's slot (8 bytes a bucket); an entry in a bucket costs its bucket's share.
        shares: dict[bytes, float] = {}

        def share(key: bytes) -> float:
            place = bucket_and_field(key)
            name = self._prefix + (key if place is None else place[0])
            if name not in shares:
                usage = int(self._client.memory_usage(name, samples=0) or 0)
                shares[name] = usage / max(1, int(self._client.hlen(name))) if place else usage
            return shares[name]

        with self._translated_errors():
            return [sum(share(key) for key, _ in group) / max(1, len(group)) for group in groups]

    def _delete_raw(self, keys: list[bytes]) -> None:
        # A concurrent writer may have just replaced a damaged value with a good one; deleting it then costs
        # one recomputation, never a wrong answer.
        with self._translated_errors():
            pipeline = self._client.pipeline(transaction=False)
            for key in keys:
                place = bucket_and_field(key)
                if place is None:
                    pipeline.delete(self._prefix + key)  # one key a command: a cluster's may be on any shard
                else:
                    pipeline.hdel(self._prefix + place[0], place[1])
            pipeline.execute()

    def close(self) -> None:
        self._client.close()


class RedisStore(RedisBackedStore):
    """Teacher outputs in the Redis database at `url` ("redis://[:password@]host:port/db" or "rediss://...",
    see the module doc for the query); the other options as `RedisBackedStore`'s.

    The server is pinged on open, so a wrong URL fails here; with `ping_on_open` False (a caller that degrades
    without the cache, and takes it up when it answers) the first call finds out instead.
    """

    def __init__(
        self,
        url: str,
        ttl_seconds: int | None = None,
        key_prefix: str = "",
        connect_timeout_seconds: float = DEFAULT_CONNECT_TIMEOUT_SECONDS,
        socket_timeout_seconds: float = DEFAULT_SOCKET_TIMEOUT_SECONDS,
        hmac_key: bytes | None = None,
        ping_on_open: bool = True,
    ) -> None:
        super().__init__(url, ttl_seconds, key_prefix, hmac_key)
        try:
            self._redis = redis.Redis.from_url(
                url,
                socket_connect_timeout=connect_timeout_seconds,
                socket_timeout=socket_timeout_seconds,
                retry=connection_retry(),
            )
        except ValueError as error:
            raise ValueError(f"bad Redis cache URL {self.url!r}: {error}") from None
        if ping_on_open:
            self.ping()

    @property
    def _client(self) -> redis.Redis:
        return self._redis

    def ping(self) -> None:
        with self._translated_errors():
            self._redis.ping()

    def _get_prefixed(self, keys: list[bytes]) -> list[bytes | None]:
        # Bytes, never str: the client leaves decode_responses off, and ALLOWED_QUERY keeps a URL from turning
        # it on; redis-py's annotation covers both.
        return cast(list[bytes | None], self._redis.mget(keys))

    def _scanned_servers(self) -> list[redis.Redis]:
        return [self._redis]
