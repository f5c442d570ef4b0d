"""The limits a teacher server enforces, in one value: what a request may carry, how much the server takes on
at once, and the defaults a request may leave unspecified."""

from __future__ import annotations

from dataclasses import dataclass

from services.core.contract import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_CONCURRENT_RPCS,
    DEFAULT_MAX_INFLIGHT_REQUEST_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_OUTPUT_DTYPE,
    OUTPUT_DTYPES,
)

DEFAULT_REQUEST_READ_SECONDS = 30.0
"""How long a call may take to send its request message after its headers: 64 MiB at 20 MB/s, with room."""

DEFAULT_MAX_STREAMS_PER_CONNECTION = 32
"""HTTP/2 streams (RPCs) one client connection may have open at once: half of the default
max_concurrent_rpcs, so that no one connection holds every Infer slot. gRPC clients queue calls beyond it."""

MESSAGE_FRAMING_BYTES = 512
"""Room in each InferResponse for everything but the tensor payloads and `cached` flags: the teacher name and
output names (added per message), start and count."""


@dataclass(frozen=True)
class ServiceLimits:
    """`max_message_bytes` bounds the gRPC messages the server receives and sends (it announces it in
    ListTeachers and keeps its response chunks under it); at most `max_concurrent_rpcs` TeacherService RPCs,
    and Infer requests of at most `max_inflight_request_bytes` in all, run at once (RESOURCE_EXHAUSTED with
    retry pushback beyond). A call must send its request within `request_read_seconds` of its start
    (`services.rpc.admission`), and one connection may hold at most `max_streams_per_connection` calls."""

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    default_chunk_size: int = DEFAULT_CHUNK_SIZE
    default_dtype: str = DEFAULT_OUTPUT_DTYPE
    max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS
    max_inflight_request_bytes: int = DEFAULT_MAX_INFLIGHT_REQUEST_BYTES
    request_read_seconds: float = DEFAULT_REQUEST_READ_SECONDS
    max_streams_per_connection: int = DEFAULT_MAX_STREAMS_PER_CONNECTION

    def __post_init__(self) -> None:
        if self.max_concurrent_rpcs < 1:
            raise ValueError(f"max_concurrent_rpcs must be at least 1, got {self.max_concurrent_rpcs}")
        if self.max_inflight_request_bytes < self.max_message_bytes:
            raise ValueError(
                f"max_inflight_request_bytes ({self.max_inflight_request_bytes}) must be at least "
                f"max_message_bytes ({self.max_message_bytes}), or a request of the largest size could never "
                "run"
            )
        if not self.request_read_seconds > 0:
            raise ValueError(f"request_read_seconds must be positive, got {self.request_read_seconds}")
        if self.max_streams_per_connection < 1:
            raise ValueError(
                f"max_streams_per_connection must be at least 1, got {self.max_streams_per_connection}"
            )
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_message_bytes <= MESSAGE_FRAMING_BYTES:
            raise ValueError(
                f"max_message_bytes must exceed {MESSAGE_FRAMING_BYTES}, got {self.max_message_bytes}"
            )
        if self.default_chunk_size < 1:
            raise ValueError(f"default_chunk_size must be at least 1, got {self.default_chunk_size}")
        if self.default_dtype not in OUTPUT_DTYPES:
            raise ValueError(
                f"default_dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {self.default_dtype!r}"
            )


DEFAULT_LIMITS = ServiceLimits()
