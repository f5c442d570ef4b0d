"""The cache's one key layout and value specs: every key of the cache is built here, and what a value under a
key must be.

A key is derived from everything that determines a teacher's output for one sample (the teacher's identity,
which output, its dtype, its form: full, top-k, compact or quantized, and the exact input bytes), so a key
never returns another input's or another teacher's output, values of different forms never mix, and any
experiment that feeds the same input to the same teacher reuses the entry.

Keys (namespace v3, binary; v1 keys were one opaque hash and v2 keys a readable text prefix: caches written
under either are not read, only re-filled) start with a fixed prefix, so that entries can be counted and
dropped per teacher, output and form by a prefix scan (Redis SCAN MATCH, an LMDB cursor) without reading any
value:

    b"e\x03" | teacher tag, 6 bytes | output | form | first 12 bytes of the xxh3_128 of every field

22 bytes for logits (the v2 text keys took 51): per entry, bytes the key takes are bytes the bank takes, in
Redis and in LMDB alike (`benchmarks/bank_bytes.py`). The teacher tag is the identity's first 12 hex digits
when it is hex (every zoo teacher's identity is a sha256 hex digest), else the first 12 hex digits of its
xxh3_64, stored as their 6 bytes. The output is one byte 0 for the logits, else one length byte and the
name. The form is one code byte (the full form's dtype, the compact and the quantized forms), and for a
top-k part the code and k as u16. 96 bits of hash keep apart the entries of one teacher, output and form:
the chance that two of 10⁹ collide is about 10⁻¹¹. Readable labels (`parse_key`, `ekd cache stats`) are
`f16` (the dtype's short name) for a full value, `top<k>.<dtype>` for a top-k part, `compact` and
`quantized`.
The compact and quantized forms apply only to logits (`stored_form`); `OutputEntries` names one teacher
output's entries (their keys and the spec a read checks), the one way the client, the servicer and the bank
writer build them.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import xxhash

from services.core.contract import LOGITS
from services.formats.codec import DTYPE_CODES, DTYPE_NAMES, DTYPES
from services.formats.soft_labels import CompactLogits, entries_that_fit

KEY_NAMESPACE = b"e\x03"
INPUT_DIGEST_SIZE = 16  # bytes of an xxh3_128 digest
KEY_HASH_SIZE = 12  # bytes of the xxh3_128 that ends a key
TEACHER_TAG_LENGTH = 12  # hex digits: 6 bytes in a key
_INPUT_DIGEST_DOMAIN = b"ekd-input-v1"

FULL = "full"
COMPACT = "compact"
QUANTIZED = "quantized"
FORMS = (FULL, COMPACT, QUANTIZED)
"""Value forms: `full` stores the tensor (or, with top_k > 0, a top-k part) in its dtype; `compact` stores
logits as `services.formats.soft_labels` frames, `quantized` as `services.formats.quantized_logits` frames."""

_DTYPE_LABELS = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "uint8": "u8", "int64": "i64"}
_DTYPES_BY_LABEL = {label: dtype for dtype, label in _DTYPE_LABELS.items()}
_HEX = re.compile(r"[0-9a-f]+")
_TOP_K_LABEL = re.compile(r"top([1-9][0-9]*)\.([a-z0-9]+)")

# Form codes (one byte of a key). Part of the stored layout: never renumber, only append.
_TOP_K_FLAG = 0x40  # | the dtype's code, then k as u16
_FORM_CODES = {COMPACT: 0x80, QUANTIZED: 0x81}
_FORMS_BY_CODE = {code: form for form, code in _FORM_CODES.items()}
_LABELS_BY_DTYPE_CODE = {code: _DTYPE_LABELS[dtype] for dtype, code in DTYPE_CODES.items()}
_LOGITS_OUTPUT = b"\x00"  # the output every form serves takes one byte; any other its length and name
_MAX_TOP_K = 2**16 - 1
_MAX_OUTPUT_BYTES = 255

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
    """The readable name of a key's form: `compact`, `quantized`, `top<k>.<dtype>` or the dtype's short
    name."""
    if form in _FORM_CODES:
        return form
    return f"top{top_k}.{_DTYPE_LABELS[dtype]}" if top_k else _DTYPE_LABELS[dtype]


def _form_segment(label: str) -> bytes:
    """The bytes of a key that name the form `label` (see `form_label`)."""
    if label in _FORM_CODES:
        return bytes([_FORM_CODES[label]])
    if label in _DTYPES_BY_LABEL:
        return bytes([DTYPE_CODES[_DTYPES_BY_LABEL[label]]])
    top_k = _TOP_K_LABEL.fullmatch(label)
    if top_k and top_k[2] in _DTYPES_BY_LABEL and int(top_k[1]) <= _MAX_TOP_K:
        code = _TOP_K_FLAG | DTYPE_CODES[_DTYPES_BY_LABEL[top_k[2]]]
        return struct.pack("<BH", code, int(top_k[1]))
    raise ValueError(f"unknown form label {label!r}")


def _output_segment(output: str) -> bytes:
    if output == LOGITS:
        return _LOGITS_OUTPUT
    name = output.encode()
    if not 1 <= len(name) <= _MAX_OUTPUT_BYTES:
        raise ValueError(f"output must be a name of 1 to {_MAX_OUTPUT_BYTES} bytes; got {output!r}")
    return bytes([len(name)]) + name


def key_prefix(tag: str, output: str | None = None, label: str | None = None) -> bytes:
    """The prefix every key of teacher tag `tag` (and of `output`, and of form `label`) starts with."""
    if label is not None and output is None:
        raise ValueError("a key prefix with a form label needs the output too")
    if len(tag) != TEACHER_TAG_LENGTH or not _HEX.fullmatch(tag):
        raise ValueError(f"a teacher tag is {TEACHER_TAG_LENGTH} hex digits; got {tag!r}")
    prefix = KEY_NAMESPACE + bytes.fromhex(tag)
    if output is not None:
        prefix += _output_segment(output)
    if label is not None:
        prefix += _form_segment(label)
    return prefix


@dataclass(frozen=True)
class KeyFields:
    """What a key's readable prefix says: teacher tag, output and form label."""

    tag: str
    output: str
    label: str


def _parsed_form(segment: bytes) -> str | None:
    """The label of a key's form segment (what remains between the output and the hash); None if foreign."""
    if len(segment) == 1 and segment[0] in _FORMS_BY_CODE:
        return _FORMS_BY_CODE[segment[0]]
    if len(segment) == 1 and segment[0] in _LABELS_BY_DTYPE_CODE:
        return _LABELS_BY_DTYPE_CODE[segment[0]]
    if len(segment) == 3 and segment[0] & _TOP_K_FLAG and (segment[0] ^ _TOP_K_FLAG) in _LABELS_BY_DTYPE_CODE:
        (top_k,) = struct.unpack_from("<H", segment, 1)
        return f"top{top_k}.{_LABELS_BY_DTYPE_CODE[segment[0] ^ _TOP_K_FLAG]}" if top_k else None
    return None


def parse_key(key: bytes) -> KeyFields | None:
    """The readable fields of a v3 key; None for anything else (another namespace, a foreign key)."""
    tag_end = len(KEY_NAMESPACE) + TEACHER_TAG_LENGTH // 2
    if not key.startswith(KEY_NAMESPACE) or len(key) < tag_end + 2 + KEY_HASH_SIZE:
        return None
    if key[tag_end : tag_end + 1] == _LOGITS_OUTPUT:
        output, form_start = LOGITS, tag_end + 1
    else:
        form_start = tag_end + 1 + key[tag_end]
        try:
            output = key[tag_end + 1 : form_start].decode()
        except UnicodeDecodeError:
            return None
    label = _parsed_form(key[form_start:-KEY_HASH_SIZE])
    if label is None or (output == LOGITS and form_start != tag_end + 1):
        return None
    return KeyFields(key[len(KEY_NAMESPACE) : tag_end].hex(), output, label)


def output_key(
    teacher_identity: str, output: str, dtype: str, top_k: int, digest: bytes, *, form: str = FULL
) -> bytes:
    """The cache key of one teacher output for one input (layout in the module doc). `top_k` is whatever
    truncation the caller applies to a full-form value (its convention, e.g. 0 for none); the compact and
    quantized forms fix their own encoding, so with them `top_k` must be 0 and `dtype` is not part of the
    key."""
    tag = teacher_tag(teacher_identity)
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; allowed: {', '.join(FORMS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be a non-negative int; got {top_k!r}")
    if form != FULL and top_k:
        raise ValueError(f"the {form} form keeps its own encoding; top_k must be 0, got {top_k}")
    if top_k > _MAX_TOP_K:
        raise ValueError(f"top_k must be at most {_MAX_TOP_K}; got {top_k}")
    if not isinstance(digest, bytes) or len(digest) != INPUT_DIGEST_SIZE:
        raise ValueError(
            f"digest must be the {INPUT_DIGEST_SIZE}-byte bytes from input_digest; got {digest!r}"
        )
    label = form_label(dtype, top_k, form)
    fields = _length_prefixed(
        teacher_identity.encode(),
        output.encode(),
        (dtype if form == FULL else form).encode(),
        struct.pack("<Q", top_k),
        form.encode(),
        digest,
    )
    return key_prefix(tag, output, label) + xxhash.xxh3_128_digest(fields)[:KEY_HASH_SIZE]


# A compact-form logits key, split where a Redis store keeps it in a hash (a bucket) rather than a key of its
# own: the key's prefix and the hash's first 2 bytes name the bucket (65,536 per teacher), the rest of the
# hash the field. A Redis key costs about 90 bytes of its own, more than a compact frame; a field of a small
# hash (Redis's listpack encoding, up to `hash-max-listpack-entries` fields of at most
# `hash-max-listpack-value` bytes) costs a few. 20.5 M compact views of one teacher (ImageNet, 16 views) are
# about 313 a bucket.
BUCKET_HASH_BYTES = 2
_COMPACT_LOGITS_PREFIX_LENGTH = len(KEY_NAMESPACE) + TEACHER_TAG_LENGTH // 2 + len(_LOGITS_OUTPUT) + 1
BUCKET_KEY_LENGTH = _COMPACT_LOGITS_PREFIX_LENGTH + BUCKET_HASH_BYTES


def _is_compact_logits_prefix(prefix: bytes) -> bool:
    tag_end = len(KEY_NAMESPACE) + TEACHER_TAG_LENGTH // 2
    return (
        prefix.startswith(KEY_NAMESPACE)
        and prefix[tag_end : tag_end + 1] == _LOGITS_OUTPUT
        and prefix[tag_end + 1] == _FORM_CODES[COMPACT]
    )


def bucket_and_field(key: bytes) -> tuple[bytes, bytes] | None:
    """(bucket, field) of a compact-form logits key, which a Redis store keeps in a hash; None for any other
    key, kept under its own name."""
    if len(key) != _COMPACT_LOGITS_PREFIX_LENGTH + KEY_HASH_SIZE or not _is_compact_logits_prefix(key):
        return None
    return key[:BUCKET_KEY_LENGTH], key[BUCKET_KEY_LENGTH:]


def is_bucket(name: bytes) -> bool:
    """Whether `name`, as a Redis scan finds it, is a bucket of compact-form entries (`bucket_and_field`)."""
    return len(name) == BUCKET_KEY_LENGTH and _is_compact_logits_prefix(name)


def is_quantized_key(key: bytes) -> bool:
    """Whether `key` is a quantized-form key: its value is a `services.formats.quantized_logits` frame."""
    fields = parse_key(key)
    return fields is not None and fields.label == QUANTIZED


@dataclass(frozen=True)
class ValueSpec:
    """What the value under a key must be: a full-form tensor of `dtype` and per-sample `shape`, one row of
    compact logits of `shape[0]` classes (`form` COMPACT, `dtype` None), or the float32 [`shape[0]`] logits
    a quantized frame decodes to (`form` QUANTIZED). Made by `full`, `compact` and `of`."""

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
        """The spec of a value in `form`: compact logits of `num_classes` classes, quantized logits of
        `num_classes` classes, or `full(dtype, shape)`."""
        if form == QUANTIZED:
            return cls(QUANTIZED, "float32", (int(num_classes),))
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
    """The form `output` is stored in when the logits are asked for in `logits_form`: the compact and
    quantized forms apply only to logits; feature maps are always full."""
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
