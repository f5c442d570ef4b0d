"""The teacher-output cache's store interface, which every backend implements (keys and value specs:
`services.cache.layout`).

Values are framed by `services.formats.codec`, or by `services.formats.soft_labels` for the compact form and
`services.formats.quantized_logits` under a quantized-form key, so damage is detected on read, never returned
as data;
with a secret configured each value also carries an HMAC tag (`services.cache.authentication`), so a value
nobody with the secret wrote is never returned either. A reader that says what it expects (`ValueSpec`: dtype
and per-sample shape, or the compact form's class count) never gets a value of another kind: an intact frame
of the wrong dtype or shape, which only a foreign or buggy writer leaves, is treated like a damaged one."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from types import TracebackType

import torch

from services.cache.authentication import ValueAuthenticator
from services.cache.corrupt_values import ForgedValueError, WrongKindValueError, corrupt_values
from services.cache.layout import KEY_NAMESPACE, CachedValue, ValueSpec, is_quantized_key
from services.core.errors import UserError
from services.formats import quantized_logits
from services.formats.codec import CorruptValueError, decode_value, encode_value
from services.formats.soft_labels import CompactLogits, decode, encode, is_compact_frame


class CacheError(RuntimeError):
    """The cache cannot serve a request; callers may fall back to computing the outputs."""


class CacheUnavailableError(CacheError, UserError):
    """The cache backend cannot be reached or opened."""


class CacheUnreachableError(CacheUnavailableError):
    """The cache server did not answer (refused the connection, timed out): it may be down or still starting,
    unlike one that answered with a refusal (a wrong password)."""


class CacheFullError(CacheError, UserError):
    """The cache backend has no room for a write."""


@dataclass(frozen=True)
class CacheStats:
    """Counts since the store was opened. Every looked-up key is a hit or a miss; `corrupt` counts the misses
    that were damaged, forged or of the wrong kind (deleted on sight). Byte counts are stored sizes (frames,
    and tags when authenticated)."""

    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    puts: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


def _encoded(key: bytes, value: CachedValue) -> bytes:
    if is_quantized_key(key):
        if not isinstance(value, torch.Tensor) or value.dim() != 1:
            raise ValueError(f"a quantized-form value is one sample's logits [classes]; got {value!r}")
        return quantized_logits.encode(value.unsqueeze(0))[0]
    if isinstance(value, CompactLogits):
        if len(value) != 1:
            raise ValueError(f"a cache value is one sample's compact logits; got {len(value)} rows")
        return encode(value)[0]
    return encode_value(value)


def _check_keys(keys: Sequence[bytes]) -> None:
    for key in keys:
        if not isinstance(key, bytes):
            raise TypeError(f"cache keys are bytes from output_key; got {type(key).__name__} {key!r}")


class TeacherOutputStore(ABC):
    """A key -> tensor store with batched reads and writes, one backend round trip each.

    Backends implement the raw byte operations; this class owns encoding, authentication, corruption handling
    and stats. Values are stored as given: the caller picks the dtype (fp16 by default) and puts it in the
    key. With `hmac_key` (a secret of at least 16 bytes) every value is written with an HMAC tag and read back
    only with a valid one (`services.cache.authentication`).
    """

    def __init__(self, hmac_key: bytes | None = None) -> None:
        self._stats = CacheStats()
        self._stats_lock = threading.Lock()
        self._authenticator = ValueAuthenticator(hmac_key) if hmac_key is not None else None

    @property
    def authenticated(self) -> bool:
        """Whether values are written with, and read only with, a valid HMAC tag."""
        return self._authenticator is not None

    @abstractmethod
    def _get_raw(self, keys: list[bytes]) -> list[bytes | None]:
        """The stored bytes for each key, None where absent; one round trip. A value is written whole or
        not at all (one LMDB transaction, one Redis SET), so a value read back is never half of one."""

    @abstractmethod
    def _put_raw(self, items: list[tuple[bytes, bytes]]) -> None:
        """Store each (key, bytes), overwriting; one round trip."""

    @abstractmethod
    def _delete_raw(self, keys: list[bytes]) -> None:
        """Remove the keys; absent keys are not an error."""

    @abstractmethod
    def _scan_raw(self, prefix: bytes) -> Iterator[tuple[bytes, int]]:
        """(key, stored value bytes) of every key starting with `prefix`, without reading the values."""

    @abstractmethod
    def close(self) -> None:
        """Release the backend's connections or handles."""

    def scan(self, prefix: bytes = KEY_NAMESPACE) -> Iterator[tuple[bytes, int]]:
        """(key, value size in bytes) of every entry whose key starts with `prefix` (all of this namespace by
        default), in no particular order; values are not read."""
        return self._scan_raw(prefix)

    def entry_bytes(self, groups: Sequence[Sequence[tuple[bytes, int]]]) -> list[float] | None:
        """For each group (a sample of (key, value size) pairs of one teacher, output and form, as `scan`
        gives them), the mean bytes the backend spends holding one such entry, all-in: key, value and the
        backend's own overhead, from its own accounting; None where the backend does not tell."""
        return None

    def delete_many(self, keys: Sequence[bytes]) -> None:
        """Remove the keys; absent keys are not an error."""
        keys = list(keys)
        _check_keys(keys)
        if keys:
            self._delete_raw(keys)

    def read_stored(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """The bytes stored under each key as they are (frames with their HMAC tags), unchecked and uncounted:
        for moving a bank between stores (`trainer.bank.transfer`), whose reader checks them."""
        keys = list(keys)
        _check_keys(keys)
        return self._get_raw(keys) if keys else []

    def write_stored(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        """Store each (key, stored bytes) as it is, overwriting: the other half of `read_stored`, for bytes
        whose tags and checksums the caller has checked (`trainer.bank.transfer`)."""
        _check_keys([key for key, _ in items])
        if items:
            self._put_raw(list(items))

    def ping(self) -> None:
        """One round trip to the backend; CacheError when it cannot answer."""
        self._get_raw([KEY_NAMESPACE])

    def get_many(
        self, keys: Sequence[bytes], expected: Sequence[ValueSpec] | None = None
    ) -> list[CachedValue | None]:
        """The cached value for each key, in order, None for a miss: a tensor, or a one-row `CompactLogits`
        for a compact-form key. `expected`, one `ValueSpec` per key, says what each value must be. A damaged
        value, one without a valid tag when authenticated, or one that does not fit its `expected` is counted
        as corrupt, deleted and returned as None."""
        return self._lookup(keys, expected)[0]

    def _lookup(
        self, keys: Sequence[bytes], expected: Sequence[ValueSpec] | None
    ) -> tuple[list[CachedValue | None], int]:
        """`get_many`'s values and how many of them were corrupt, for `services.cache.guard`, whose callers
        attribute corrupt values to the request that found them."""
        keys = list(keys)
        _check_keys(keys)
        if expected is not None and len(expected) != len(keys):
            raise ValueError(
                f"expected must give one ValueSpec per key: {len(expected)} for {len(keys)} keys"
            )
        if not keys:
            return [], 0
        values: list[CachedValue | None] = []
        corrupt_keys = []
        bytes_read = 0
        for index, (key, raw) in enumerate(zip(keys, self._get_raw(keys), strict=True)):
            if raw is None:
                values.append(None)
                continue
            bytes_read += len(raw)
            try:
                value = self._decoded(key, raw)
                problem = expected[index].mismatch(value) if expected is not None else None
                if problem is not None:
                    raise WrongKindValueError(problem)
                values.append(value)
            except CorruptValueError as error:
                corrupt_values.found(error)  # reported in one line per interval, not one each
                corrupt_keys.append(key)
                values.append(None)
        if corrupt_keys:
            self._delete_raw(corrupt_keys)
        hits = sum(value is not None for value in values)
        self._count(hits=hits, misses=len(keys) - hits, corrupt=len(corrupt_keys), bytes_read=bytes_read)
        return values, len(corrupt_keys)

    def _decoded(self, key: bytes, raw: bytes) -> CachedValue:
        frame: bytes | memoryview = raw
        if self._authenticator is not None:
            verified = self._authenticator.verified_frame(key, raw)
            if verified is None:
                raise ForgedValueError("no valid HMAC tag for this key: not written with this cache's secret")
            frame = verified
        if is_quantized_key(key) != quantized_logits.is_quantized_frame(frame):
            raise CorruptValueError("a quantized frame only under a quantized-form key, and only that")
        if quantized_logits.is_quantized_frame(frame):
            return quantized_logits.decode(frame)
        return decode(frame) if is_compact_frame(frame) else decode_value(frame)

    def put_many(self, items: Sequence[tuple[bytes, CachedValue]]) -> None:
        """Store each (key, value), overwriting existing values: a tensor (quantized under a quantized-form
        key, see `services.formats.quantized_logits`), or a one-row `CompactLogits` under a compact-form
        key."""
        _check_keys([key for key, _ in items])
        if not items:
            return
        encoded = [(key, _encoded(key, value)) for key, value in items]
        if self._authenticator is not None:
            encoded = [(key, self._authenticator.sign(key, frame)) for key, frame in encoded]
        self._put_raw(encoded)
        self._count(puts=len(encoded), bytes_written=sum(len(value) for _, value in encoded))

    @property
    def stats(self) -> CacheStats:
        """A snapshot of the counts."""
        with self._stats_lock:
            return self._stats

    def _count(self, **increments: int) -> None:
        with self._stats_lock:
            current = self._stats
            self._stats = CacheStats(
                **{f.name: getattr(current, f.name) + increments.get(f.name, 0) for f in fields(current)}
            )

    def __enter__(self) -> TeacherOutputStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
