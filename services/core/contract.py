"""The constants of the teacher-service contract (proto/ekd/v1/teacher.proto), defined once.

The generated code in `services._generated` carries the messages; this module carries what the proto states in
comments and every side must agree on: the name of the logits output, the output dtypes a request may ask for,
and the server's default limits, which a client assumes until `ListTeachers` reports the real ones.
"""

from __future__ import annotations

from typing import Literal, get_args

LOGITS = "logits"
"""The output name of a teacher's class scores; every other output name is a feature tap."""

OutputDtype = Literal["float32", "float16", "bfloat16"]
"""The dtypes a teacher output may be streamed and cached in, as a type (config fields use it)."""

OUTPUT_DTYPES: tuple[OutputDtype, ...] = get_args(OutputDtype)
"""The dtypes a teacher output may be streamed and cached in."""

DEFAULT_OUTPUT_DTYPE: OutputDtype = "float16"
"""The dtype of outputs when a request leaves `output_dtype` unspecified."""

DEFAULT_MAX_BATCH_SIZE = 512
"""The most samples one InferRequest may carry, unless the service is configured otherwise."""

DEFAULT_MAX_MESSAGE_BYTES = 64 * 2**20
"""The largest gRPC message either side sends or accepts, unless the service is configured otherwise."""

DEFAULT_CHUNK_SIZE = 64
"""Samples per streamed InferResponse when the request leaves `chunk_size` at 0."""

MAX_TEACHERS_PER_REQUEST = 64
"""The most teachers one InferRequest may name (INVALID_ARGUMENT beyond)."""

MAX_OUTPUTS_PER_REQUEST = 64
"""The most outputs one InferRequest may name (INVALID_ARGUMENT beyond)."""

MAX_NAME_LENGTH = 256
"""The longest teacher or output name, in characters, a request may carry (INVALID_ARGUMENT beyond)."""

MAX_REQUEST_ID_LENGTH = 128
"""The longest InferRequest.request_id, in characters (INVALID_ARGUMENT beyond); it appears in server logs."""

DEFAULT_MAX_CONCURRENT_RPCS = 64
"""The most TeacherService RPCs a server runs at once, unless configured otherwise (RESOURCE_EXHAUSTED
beyond; health checks and reflection are not counted)."""

DEFAULT_MAX_INFLIGHT_REQUEST_BYTES = 4 * DEFAULT_MAX_MESSAGE_BYTES
"""The most bytes of Infer requests a server processes at once, unless configured otherwise
(RESOURCE_EXHAUSTED beyond)."""

RETRY_PUSHBACK_METADATA = "grpc-retry-pushback-ms"
"""Trailing metadata of a refusal that may be retried: after how many milliseconds (gRPC's retry-pushback
key). The servicer sets it when its admission caps refuse an Infer; the client retries only such a
RESOURCE_EXHAUSTED, never one that says the request itself is too large."""

ADMISSION_RETRY_MILLISECONDS = 250
"""The pushback a refused Infer carries: long enough for a request ahead of it to finish."""
