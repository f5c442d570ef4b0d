"""The teacher-output cache: key derivation and the store interface every backend implements.

A key is derived from everything that determines a teacher's output for one sample (the teacher's identity,
which output, its dtype and top-k truncation, and the exact input bytes), so a key never returns another
input's or another teacher's output, and any experiment that feeds the same input to the same teacher reuses
the entry. Values are framed by `services.codec`, so damage is detected on read, never returned as data.
"""

from __future__ import annotations

import logging
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields
from types import TracebackType
from urllib.parse import urlsplit

import torch
import xxhash

from services.codec import DTYPES, CorruptValueError, decode_value, encode_value
from services.errors import UserError

logger = logging.getLogger(__name__)

KEY_NAMESPACE = b"ekd:v1:"
INPUT_DIGEST_SIZE = 16  # bytes of an xxh3_128 digest
_INPUT_DIGEST_DOMAIN = b"ekd-input-v1"


class CacheError(RuntimeError):
    """The cache cannot serve a request; callers may fall back to computing the outputs."""


class CacheUnavailableError(CacheError, UserError):
    """The cache backend cannot be reached or opened."""


class CacheFullError(CacheError, UserError):
    """The cache backend has no room for a write."""


def redact_url(url: str) -> str:
    """The URL with any password replaced by "***", for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def _length_prefixed(*fields: bytes) -> bytes:
    """Concatenate fields so that no two different field lists encode to the same bytes."""
    return b"".join(struct.pack("<Q", len(field)) + field for field in fields)


def input_digests(batch: torch.Tensor) -> list[bytes]:
    """xxh3_128 of each sample of a uint8 [B, C, H, W] batch: its exact bytes plus its shape and dtype, so
    two samples collide only if they are the same image (a reshaped buffer hashes differently)."""
    if batch.dtype != torch.uint8 or batch.dim() != 4:
        raise ValueError(
            "input digests need a uint8 [B, C, H, W] batch; "
            f"got {batch.dtype} with shape {tuple(batch.shape)}"
        )
    samples = batch.detach().cpu().contiguous().numpy()
    sample_header = _length_prefixed(
        _INPUT_DIGEST_DOMAIN, b"uint8", struct.pack(f"<{samples.ndim - 1}Q", *samples.shape[1:])
    )
    digests = []
    for sample in samples:
        hasher = xxhash.xxh3_128(sample_header)
        hasher.update(sample)
        digests.append(hasher.digest())
    return digests


def input_digest(image: torch.Tensor) -> bytes:
    """The digest of one uint8 [C, H, W] sample; equal to its entry in `input_digests` of any batch."""
    if image.dim() != 3:
        raise ValueError(f"input digest needs one uint8 [C, H, W] sample; got shape {tuple(image.shape)}")
    return input_digests(image.unsqueeze(0))[0]


def output_key(teacher_identity: str, output: str, dtype: str, top_k: int, digest: bytes) -> bytes:
    """The cache key of one teacher output for one input: `ekd:v1:` + hex xxh3_128 over all fields,
    length-prefixed. `top_k` is whatever truncation the caller applies (its convention, e.g. 0 for none)."""
    if not teacher_identity:
        raise ValueError("teacher_identity must be a non-empty string")
    if not output:
        raise ValueError("output must be a non-empty output name")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be a non-negative int; got {top_k!r}")
    if not isinstance(digest, bytes) or len(digest) != INPUT_DIGEST_SIZE:
        raise ValueError(
            f"digest must be the {INPUT_DIGEST_SIZE}-byte bytes from input_digest; got {digest!r}"
        )
    fields = _length_prefixed(
        teacher_identity.encode(), output.encode(), dtype.encode(), struct.pack("<Q", top_k), digest
    )
    return KEY_NAMESPACE + xxhash.xxh3_128_hexdigest(fields).encode()


@dataclass(frozen=True)
class CacheStats:
    """Counts since the store was opened. Every looked-up key is a hit or a miss; `corrupt` counts the misses
    that were damaged values (deleted on sight). Byte counts are encoded (framed) sizes."""

    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    puts: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


def _check_keys(keys: Sequence[bytes]) -> None:
    for key in keys:
        if not isinstance(key, bytes):
            raise TypeError(f"cache keys are bytes from output_key; got {type(key).__name__} {key!r}")


class TeacherOutputStore(ABC):
    """A key -> tensor store with batched reads and writes, one backend round trip each.

    Backends implement the raw byte operations; this class owns encoding, corruption handling and stats.
    Values are stored as given: the caller picks the dtype (fp16 by default) and puts it in the key.
    """

    def __init__(self) -> None:
        self._stats = CacheStats()
        self._stats_lock = threading.Lock()

    @abstractmethod
    def _get_raw(self, keys: list[bytes]) -> list[bytes | None]:
        """The stored bytes for each key, None where absent; one round trip."""

    @abstractmethod
    def _put_raw(self, items: list[tuple[bytes, bytes]]) -> None:
        """Store each (key, bytes), overwriting; one round trip."""

    @abstractmethod
    def _delete_raw(self, keys: list[bytes]) -> None:
        """Remove the keys; absent keys are not an error."""

    @abstractmethod
    def close(self) -> None:
        """Release the backend's connections or handles."""

    def get_many(self, keys: Sequence[bytes]) -> list[torch.Tensor | None]:
        """The cached tensor for each key, in order, None for a miss. A damaged value is counted, deleted and
        returned as None."""
        keys = list(keys)
        _check_keys(keys)
        if not keys:
            return []
        values: list[torch.Tensor | None] = []
        corrupt_keys = []
        bytes_read = 0
        for key, raw in zip(keys, self._get_raw(keys), strict=True):
            if raw is None:
                values.append(None)
                continue
            bytes_read += len(raw)
            try:
                values.append(decode_value(raw))
            except CorruptValueError as error:
                logger.warning("deleting corrupt cache value under %r: %s", key, error)
                corrupt_keys.append(key)
                values.append(None)
        if corrupt_keys:
            self._delete_raw(corrupt_keys)
        hits = sum(value is not None for value in values)
        self._count(hits=hits, misses=len(keys) - hits, corrupt=len(corrupt_keys), bytes_read=bytes_read)
        return values

    def put_many(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> None:
        """Store each (key, tensor), overwriting existing values."""
        _check_keys([key for key, _ in items])
        if not items:
            return
        encoded = [(key, encode_value(tensor)) for key, tensor in items]
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
