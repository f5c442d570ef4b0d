"""The cache's one key layout and value specs: every key of the cache is built here, and what a value under a
key must be.

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
encoding, whatever the dtype).
The compact form applies only to logits (`stored_form`); `OutputEntries` names one teacher output's entries
(their keys and the spec a read checks), the one way the client, the servicer and the bank writer build them.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import xxhash

from services.core.contract import LOGITS
from services.formats.codec import DTYPE_NAMES, DTYPES
from services.formats.soft_labels import CompactLogits, entries_that_fit

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

    @classmethod
    def of(cls, form: str, dtype: str, *, num_classes: int, shape: Sequence[int]) -> ValueSpec:
        """The spec of a value in `form`: compact logits of `num_classes` classes, or `full(dtype, shape)`."""
        return cls.compact(num_classes) if form == COMPACT else cls.full(dtype, shape)

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
        if self.dtype is None:  # `full` always sets one; only `compact` leaves it None
            raise ValueError("a full-form ValueSpec without a dtype")
        if value.dtype != DTYPES[self.dtype] or tuple(value.shape) != self.shape:
            return (
                f"a {DTYPE_NAMES.get(value.dtype, value.dtype)} tensor of shape {tuple(value.shape)} where "
                f"{self.dtype} of shape {self.shape} is expected"
            )
        return None


def stored_form(output: str, logits_form: str) -> str:
    """The form `output` is stored in when the logits are asked for in `logits_form`: the compact form applies
    only to logits; feature maps are always full."""
    if logits_form not in FORMS:
        raise ValueError(f"unknown form {logits_form!r}; allowed: {', '.join(FORMS)}")
    return logits_form if output == LOGITS else FULL


@dataclass(frozen=True)
class OutputEntries:
    """One teacher output's cache entries, one per input: the key of each input digest, and what a value
    under them must be. Made by `of`."""

    identity: str
    output: str
    dtype: str
    form: str
    top_k: int = 0

    @classmethod
    def of(cls, identity: str, output: str, dtype: str, *, logits_form: str, top_k: int = 0) -> OutputEntries:
        """The entries of `output` of the teacher `identity`, in `dtype` (with `top_k`, one part of the
        logits' top k), when its logits are stored in `logits_form`."""
        return cls(identity, output, dtype, stored_form(output, logits_form), top_k)

    def key(self, digest: bytes) -> bytes:
        return output_key(self.identity, self.output, self.dtype, self.top_k, digest, form=self.form)

    def keys(self, digests: Sequence[bytes]) -> list[bytes]:
        return [self.key(digest) for digest in digests]

    def spec(self, *, num_classes: int, shape: Sequence[int]) -> ValueSpec:
        """What a value must be: one row of compact logits of `num_classes` classes, or a full-form tensor of
        this dtype and per-sample `shape`."""
        return ValueSpec.of(self.form, self.dtype, num_classes=num_classes, shape=shape)
