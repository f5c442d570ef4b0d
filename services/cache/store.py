"""The teacher-output cache: key derivation and the store interface every backend implements.

A key is derived from everything that determines a teacher's output for one sample (the teacher's identity,
which output, its dtype, its form: full, top-k or compact, and the exact input bytes), so a key never returns
another input's or another teacher's output, full and compact values never mix, and any experiment that feeds
the same input to the same teacher reuses the entry.

Keys (namespace v2; v1 keys were one opaque hash, so caches written before are not read, only re-filled) start
with a readable prefix, so that entries can be counted and dropped per teacher, output and form by a prefix
scan (Redis SCAN MATCH, an LMDB cursor) without reading any value:

    ekd:v2:<teacher tag>:<output>:<form label>:<xxh3_128 of every field, 16 raw bytes>

The teacher tag is the identity's first 12 characters when it is hex (every zoo teacher's identity is a sha256
hex digest), else the first 12 hex digits of its xxh3_64; the form label is the dtype's short name for a full
value (`f16`), `top<k>.<dtype>` for a top-k part and `compact` for the compact soft-label form (its own
encoding, whatever the dtype). Values are framed by `services.formats.codec`, or by
`services.formats.soft_labels` for the compact form, so damage is detected on read, never returned as data;
with a secret configured each value also carries an HMAC tag (`services.cache.authentication`), so a value
nobody with the secret wrote is never returned either. A reader that says what it expects (`ValueSpec`: dtype
and per-sample shape, or the compact form's class count) never gets a value of another kind: an intact frame
of the wrong dtype or shape, which only a foreign or buggy writer leaves, is treated like a damaged one."""

from __future__ import annotations

import logging
import re
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from types import TracebackType
from urllib.parse import parse_qsl, urlencode, urlsplit

import torch
import xxhash

from services.cache.authentication import ValueAuthenticator
from services.core.errors import UserError
from services.formats.codec import DTYPE_NAMES, DTYPES, CorruptValueError, decode_value, encode_value
from services.formats.soft_labels import CompactLogits, decode, encode, entries_that_fit, is_compact_frame

logger = logging.getLogger(__name__)

KEY_NAMESPACE = b"ekd:v2:"
INPUT_DIGEST_SIZE = 16  # bytes of an xxh3_128 digest
KEY_HASH_SIZE = 16  # bytes of the xxh3_128 that ends a key
TEACHER_TAG_LENGTH = 12
_INPUT_DIGEST_DOMAIN = b"ekd-input-v1"

FULL = "full"
COMPACT = "compact"
FORMS = (FULL, COMPACT)
"""Value forms: `full` stores the tensor (or, with top_k > 0, a top-k part) in its dtype; `compact` stores
logits as `services.formats.soft_labels` frames."""

_DTYPE_LABELS = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "uint8": "u8", "int64": "i64"}
_HEX = re.compile(r"[0-9a-f]+")

CachedValue = torch.Tensor | CompactLogits


class CacheError(RuntimeError):
    """The cache cannot serve a request; callers may fall back to computing the outputs."""


class CacheUnavailableError(CacheError, UserError):
    """The cache backend cannot be reached or opened."""


class CacheUnreachableError(CacheUnavailableError):
    """The cache server did not answer (refused the connection, timed out): it may be down or still starting,
    unlike one that answered with a refusal (a wrong password)."""


class CacheFullError(CacheError, UserError):
    """The cache backend has no room for a write."""


_SECRET_QUERY_NAME = re.compile(r"pass|secret|token|auth|cred", re.IGNORECASE)


def redact_url(url: str) -> str:
    """The URL with any password, and the value of any query parameter whose name suggests a secret
    (password, secret, token, auth, credential), replaced by "***", for messages and logs."""
    parts = urlsplit(url)
    if parts.password is not None:
        user = parts.username or ""
        host = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{user}:***@{host}")
    if parts.query:
        query = parse_qsl(parts.query, keep_blank_values=True)
        if any(_SECRET_QUERY_NAME.search(name) for name, _ in query):
            redacted = [(name, "***" if _SECRET_QUERY_NAME.search(name) else value) for name, value in query]
            parts = parts._replace(query=urlencode(redacted, safe="/*"))
    return parts.geturl()


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


def teacher_tag(teacher_identity: str) -> str:
    """The short name of a teacher in keys (see the module doc)."""
    if not teacher_identity:
        raise ValueError("teacher_identity must be a non-empty string")
    if len(teacher_identity) >= TEACHER_TAG_LENGTH and _HEX.fullmatch(teacher_identity):
        return teacher_identity[:TEACHER_TAG_LENGTH]
    return xxhash.xxh3_64_hexdigest(teacher_identity.encode())[:TEACHER_TAG_LENGTH]


def form_label(dtype: str, top_k: int, form: str) -> str:
    """The form segment of a key: `compact`, `top<k>.<dtype>` or the dtype's short name."""
    if form == COMPACT:
        return COMPACT
    return f"top{top_k}.{_DTYPE_LABELS[dtype]}" if top_k else _DTYPE_LABELS[dtype]


def key_prefix(tag: str, output: str | None = None, label: str | None = None) -> bytes:
    """The prefix every key of teacher tag `tag` (and of `output`, and of form `label`) starts with."""
    if label is not None and output is None:
        raise ValueError("a key prefix with a form label needs the output too")
    parts = [tag, *(part for part in (output, label) if part is not None)]
    return KEY_NAMESPACE + ":".join(parts).encode() + b":"


@dataclass(frozen=True)
class KeyFields:
    """What a key's readable prefix says: teacher tag, output and form label."""

    tag: str
    output: str
    label: str


def parse_key(key: bytes) -> KeyFields | None:
    """The readable fields of a v2 key; None for anything else (another namespace, a foreign key)."""
    if not key.startswith(KEY_NAMESPACE) or len(key) <= len(KEY_NAMESPACE) + KEY_HASH_SIZE:
        return None
    fields_part = key[len(KEY_NAMESPACE) : -KEY_HASH_SIZE]
    parts = fields_part.split(b":")
    if len(parts) != 4 or parts[3] != b"":
        return None
    try:
        return KeyFields(*(part.decode() for part in parts[:3]))
    except UnicodeDecodeError:
        return None


def output_key(
    teacher_identity: str, output: str, dtype: str, top_k: int, digest: bytes, *, form: str = FULL
) -> bytes:
    """The cache key of one teacher output for one input (layout in the module doc). `top_k` is whatever
    truncation the caller applies to a full-form value (its convention, e.g. 0 for none); the compact form
    fixes its own encoding, so with it `top_k` must be 0 and `dtype` is not part of the key."""
    tag = teacher_tag(teacher_identity)
    if not output or ":" in output:
        raise ValueError(f"output must be a non-empty output name without ':'; got {output!r}")
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; allowed: {', '.join(FORMS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be a non-negative int; got {top_k!r}")
    if form == COMPACT and top_k:
        raise ValueError(f"the compact form keeps its own top entries; top_k must be 0, got {top_k}")
    if not isinstance(digest, bytes) or len(digest) != INPUT_DIGEST_SIZE:
        raise ValueError(
            f"digest must be the {INPUT_DIGEST_SIZE}-byte bytes from input_digest; got {digest!r}"
        )
    label = form_label(dtype, top_k, form)
    fields = _length_prefixed(
        teacher_identity.encode(),
        output.encode(),
        (COMPACT if form == COMPACT else dtype).encode(),
        struct.pack("<Q", top_k),
        form.encode(),
        digest,
    )
    return key_prefix(tag, output, label) + xxhash.xxh3_128_digest(fields)


@dataclass(frozen=True)
class ValueSpec:
    """What the value under a key must be: a full-form tensor of `dtype` and per-sample `shape`, or one row
    of compact logits of `shape[0]` classes (`form` COMPACT, `dtype` None). Made by `full` and `compact`."""

    form: str
    dtype: str | None
    shape: tuple[int, ...]

    @classmethod
    def full(cls, dtype: str, shape: Sequence[int]) -> ValueSpec:
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
        return cls(FULL, dtype, tuple(int(dim) for dim in shape))

    @classmethod
    def compact(cls, num_classes: int) -> ValueSpec:
        return cls(COMPACT, None, (int(num_classes),))

    def mismatch(self, value: CachedValue) -> str | None:
        """What is wrong with a decoded `value` under a key that expects this; None when it fits."""
        if self.form == COMPACT:
            if not isinstance(value, CompactLogits):
                return f"a {DTYPE_NAMES.get(value.dtype, value.dtype)} tensor where compact logits are keyed"
            if value.num_classes != self.shape[0]:
                return f"compact logits of {value.num_classes} classes where {self.shape[0]} are expected"
            if value.entries != entries_that_fit(self.shape[0]):
                # A frame of another size (a foreign writer, another COMPACT_BYTES) would not stack with
                # this version's frames.
                fitting = entries_that_fit(self.shape[0])
                return f"compact logits of {value.entries} entries where {fitting} are expected"
            return None
        if isinstance(value, CompactLogits):
            return f"compact logits where a {self.dtype} tensor is keyed"
        if value.dtype != DTYPES[self.dtype] or tuple(value.shape) != self.shape:
            return (
                f"a {DTYPE_NAMES.get(value.dtype, value.dtype)} tensor of shape {tuple(value.shape)} where "
                f"{self.dtype} of shape {self.shape} is expected"
            )
        return None


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


def _encoded(value: CachedValue) -> bytes:
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

    def delete_many(self, keys: Sequence[bytes]) -> None:
        """Remove the keys; absent keys are not an error."""
        keys = list(keys)
        _check_keys(keys)
        if keys:
            self._delete_raw(keys)

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
                    raise CorruptValueError(problem)
                values.append(value)
            except CorruptValueError as error:
                logger.warning("deleting corrupt cache value under %r: %s", key, error)
                corrupt_keys.append(key)
                values.append(None)
        if corrupt_keys:
            self._delete_raw(corrupt_keys)
        hits = sum(value is not None for value in values)
        self._count(hits=hits, misses=len(keys) - hits, corrupt=len(corrupt_keys), bytes_read=bytes_read)
        return values, len(corrupt_keys)

    def _decoded(self, key: bytes, raw: bytes) -> CachedValue:
        frame: bytes | memoryview | None = raw
        if self._authenticator is not None:
            frame = self._authenticator.verified_frame(key, raw)
            if frame is None:
                raise CorruptValueError(
                    "no valid HMAC tag for this key: not written with this cache's secret"
                )
        return decode(frame) if is_compact_frame(frame) else decode_value(frame)

    def put_many(self, items: Sequence[tuple[bytes, CachedValue]]) -> None:
        """Store each (key, value), overwriting existing values: a tensor, or a one-row `CompactLogits` under
        a compact-form key."""
        _check_keys([key for key, _ in items])
        if not items:
            return
        encoded = [(key, _encoded(value)) for key, value in items]
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
