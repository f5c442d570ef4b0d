"""The one key layout (`services.cache.layout`) and the one set of service limits (`services.rpc.limits`)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from services.cache import (
    COMPACT,
    FULL,
    KEY_NAMESPACE,
    QUANTIZED,
    KeyFields,
    OutputEntries,
    ValueSpec,
    input_digests,
    key_prefix,
    output_key,
    parse_key,
    stored_form,
)
from services.core.contract import LOGITS
from services.rpc.limits import ServiceLimits
from services.serve.serve_config import GrpcConfig

IDENTITY = "ab" * 32


def test_the_compact_form_applies_only_to_logits() -> None:
    assert stored_form(LOGITS, COMPACT) == COMPACT
    assert stored_form("layer3", COMPACT) == FULL
    assert stored_form(LOGITS, FULL) == FULL
    with pytest.raises(ValueError, match="unknown form 'sparse'"):
        stored_form(LOGITS, "sparse")


def test_output_entries_are_the_keys_and_specs_of_the_layout() -> None:
    digests = input_digests(torch.arange(96, dtype=torch.uint8).reshape(2, 3, 4, 4))
    compact = OutputEntries.of(IDENTITY, LOGITS, "float16", logits_form=COMPACT)
    tap = OutputEntries.of(IDENTITY, "layer3", "float16", logits_form=COMPACT)
    top = OutputEntries.of(IDENTITY, LOGITS, "int64", logits_form=FULL, top_k=5)

    assert compact.keys(digests) == [
        output_key(IDENTITY, LOGITS, "float16", 0, d, form=COMPACT) for d in digests
    ]
    assert tap.keys(digests) == [output_key(IDENTITY, "layer3", "float16", 0, d) for d in digests]
    assert top.key(digests[0]) == output_key(IDENTITY, LOGITS, "int64", 5, digests[0])
    assert len({*compact.keys(digests), *tap.keys(digests)}) == 4
    assert compact.spec(num_classes=10, shape=(10,)) == ValueSpec.compact(10)
    assert tap.spec(num_classes=10, shape=(8, 2, 2)) == ValueSpec.full("float16", (8, 2, 2))


def test_limits_that_cannot_work_are_refused_in_one_place() -> None:
    with pytest.raises(ValueError, match=r"max_inflight_request_bytes \(1048576\) must be at least"):
        ServiceLimits(max_message_bytes=2**21, max_inflight_request_bytes=2**20)
    with pytest.raises(ValidationError, match=r"max_inflight_request_bytes \(1048576\) must be at least"):
        GrpcConfig(max_message_bytes=2**21, max_inflight_request_bytes=2**20)
    with pytest.raises(ValueError, match="default_dtype must be one of"):
        ServiceLimits(default_dtype="int8")
    assert GrpcConfig(max_batch_size=8).limits == ServiceLimits(max_batch_size=8)


def test_keys_are_short_binary_and_their_prefix_reads_back_teacher_output_and_form() -> None:
    digest = input_digests(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))[0]
    tag = IDENTITY[:12]
    for output, dtype, top_k, form, label in (
        (LOGITS, "float16", 0, FULL, "f16"),
        (LOGITS, "float16", 0, COMPACT, "compact"),
        (LOGITS, "float16", 0, QUANTIZED, "quantized"),
        (LOGITS, "int64", 300, FULL, "top300.i64"),
        ("layer3", "bfloat16", 0, FULL, "bf16"),
        ("blocks.2/ünïcode", "float32", 0, FULL, "f32"),
    ):
        key = output_key(IDENTITY, output, dtype, top_k, digest, form=form)
        assert parse_key(key) == KeyFields(tag, output, label)
        assert key.startswith(key_prefix(tag, output, label)) and key.startswith(KEY_NAMESPACE)
    assert len(output_key(IDENTITY, LOGITS, "float16", 0, digest)) == 22
    # Other namespaces (the text keys of v2, the opaque hashes of v1) and damaged keys are not entries.
    v2 = b"ekd:v2:" + tag.encode() + b":logits:f16:" + bytes(16)
    logits_key = output_key(IDENTITY, LOGITS, "float16", 0, digest)
    for foreign in (v2, bytes(16), logits_key[:-13], KEY_NAMESPACE + bytes(6) + b"\x00\x7f" + bytes(12)):
        assert parse_key(foreign) is None
    with pytest.raises(ValueError, match="top_k must be 0"):
        output_key(IDENTITY, LOGITS, "float16", 5, digest, form=QUANTIZED)
    with pytest.raises(ValueError, match="1 to 255 bytes"):
        output_key(IDENTITY, "x" * 256, "float16", 0, digest)


def test_the_quantized_form_is_a_cache_form_of_logits() -> None:
    assert stored_form(LOGITS, QUANTIZED) == QUANTIZED and stored_form("layer3", QUANTIZED) == FULL
    entries = OutputEntries.of(IDENTITY, LOGITS, "float16", logits_form=QUANTIZED)
    spec = entries.spec(num_classes=1000, shape=(1000,))
    assert spec.mismatch(torch.zeros(1000)) is None
    assert spec.mismatch(torch.zeros(1000, dtype=torch.float16)) is not None
    assert spec.mismatch(torch.zeros(10)) is not None
