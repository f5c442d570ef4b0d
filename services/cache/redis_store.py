"""The production teacher-output store: a Redis server shared by every trainer and teacher host.

Reads are one MGET, writes one non-transactional pipeline of SETs. Run the server with `maxmemory` and an
eviction policy such as `allkeys-lru`: an evicted entry is simply a miss. Under `noeviction` a full server
refuses writes, which surfaces as CacheFullError.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice

import redis
from redis.backoff import NoBackoff
from redis.exceptions import OutOfMemoryError
from redis.retry import Retry

from services.cache.store import (
    CacheError,
    CacheFullError,
    CacheUnavailableError,
    TeacherOutputStore,
    redact_url,
)

_SCAN_STEP = 1000


def _glob_escaped(text: bytes) -> bytes:
    """`text` with Redis glob's special characters escaped, to match literally in SCAN MATCH."""
    for special in (b"\\", b"*", b"?", b"[", b"]"):
        text = text.replace(special, b"\\" + special)
    return text


class RedisStore(TeacherOutputStore):
    """Teacher outputs in the Redis database at `url` ("redis://[:password@]host:port/db" or "rediss://...").

    `ttl_seconds` expires entries that long after their last write (None: kept until evicted); `key_prefix`
    namespaces this store's keys on a shared server. The server is pinged on open, so a wrong URL fails here.
    """

    def __init__(
        self,
        url: str,
        ttl_seconds: int | None = None,
        key_prefix: str = "",
        connect_timeout_seconds: float = 1.0,
        socket_timeout_seconds: float = 5.0,
    ) -> None:
        super().__init__()
        if ttl_seconds is not None and (
            isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or ttl_seconds <= 0
        ):
            raise ValueError(f"ttl_seconds must be a positive int or None; got {ttl_seconds!r}")
        self.url = redact_url(url)
        self.ttl_seconds = ttl_seconds
        self._prefix = key_prefix.encode()
        try:
            self._client = redis.Redis.from_url(
                url,
                socket_connect_timeout=connect_timeout_seconds,
                socket_timeout=socket_timeout_seconds,
                # One immediate retry recovers a pooled connection the server closed; more would only delay
                # the error when the server is really down.
                retry=Retry(NoBackoff(), retries=1),
            )
        except ValueError as error:
            raise ValueError(f"bad Redis cache URL {self.url!r}: {error}") from None
        with self._translated_errors():
            self._client.ping()

    @contextmanager
    def _translated_errors(self) -> Iterator[None]:
        try:
            yield
        except redis.AuthenticationError as error:
            raise CacheUnavailableError(
                f"Redis cache at {self.url} refuses the password ({error}); give the right one in the URL: "
                "redis://:PASSWORD@host:port/db"
            ) from error
        except (redis.ConnectionError, redis.TimeoutError) as error:
            raise CacheUnavailableError(f"Redis cache at {self.url} is unavailable: {error}") from error
        except OutOfMemoryError as error:
            raise CacheFullError(
                f"Redis cache at {self.url} is out of memory and refuses writes ({error}); "
                "set maxmemory-policy to allkeys-lru so old entries are evicted, or raise maxmemory"
            ) from error
        except redis.RedisError as error:
            raise CacheError(f"Redis cache at {self.url} failed: {error}") from error

    def _get_raw(self, keys: list[bytes]) -> list[bytes | None]:
        with self._translated_errors():
            return self._client.mget([self._prefix + key for key in keys])

    def _put_raw(self, items: list[tuple[bytes, bytes]]) -> None:
        with self._translated_errors():
            pipeline = self._client.pipeline(transaction=False)
            for key, value in items:
                pipeline.set(self._prefix + key, value, ex=self.ttl_seconds)
            pipeline.execute()

    def _scan_raw(self, prefix: bytes) -> Iterator[tuple[bytes, int]]:
        # SCAN MATCH walks the keyspace in steps without blocking the server; STRLEN, pipelined per step,
        # gives each value's size without sending it.
        pattern = _glob_escaped(self._prefix + prefix) + b"*"
        with self._translated_errors():
            keys = self._client.scan_iter(match=pattern, count=_SCAN_STEP)
            while step := list(islice(keys, _SCAN_STEP)):
                pipeline = self._client.pipeline(transaction=False)
                for key in step:
                    pipeline.strlen(key)
                for key, size in zip(step, pipeline.execute(), strict=True):
                    if size:  # 0: expired or evicted since the scan saw it
                        yield key[len(self._prefix) :], size

    def _delete_raw(self, keys: list[bytes]) -> None:
        # A concurrent writer may have just replaced a damaged value with a good one; deleting it then costs
        # one recomputation, never a wrong answer.
        with self._translated_errors():
            self._client.delete(*(self._prefix + key for key in keys))

    def close(self) -> None:
        self._client.close()
