"""The gRPC TeacherService of proto/ekd/v1/teacher.proto on grpc.aio: validation, the output cache, streaming.

An Infer request is validated completely before any work starts; a bad one ends with the status code the proto
names and a message saying what is allowed. Then every requested teacher runs concurrently: cache lookups for
all its (sample, output) entries, one forward pass over the samples with any miss, a cast to the requested
dtype, and messages of at most `chunk_size` samples (fewer where they would not fit under the message size
limit) put on one queue that the response stream drains, so the first teacher's results leave before the last
teacher is done. Computed outputs are handed to a background writer (`services.cache.writer`, bounded) and the
stream ends without waiting for the write; `wait_for_cache_writes` waits for it. The cache only ever saves
work: it is read and written through a circuit breaker (`services.cache.guard`), so when it fails or freezes
the request is computed and still answered, after at most one short cache timeout, then microseconds.

Cache entries, one per sample and output (`services.cache.layout.OutputEntries`; `services.rpc.client` reads
the same store directly):

    output_key(identity, "logits", dtype, 0, digest)  -> logits [num_classes], in dtype
    output_key(identity, tap, dtype, 0, digest)       -> tap [channels, height, width], in dtype
    output_key(identity, "logits", dtype, k, digest)  -> top-k (k > 0): the k largest logits [k], descending
    output_key(identity, "logits", "int64", k, digest) -> top-k: their class indices [k], int64
    output_key(identity, "logits", …, 0, digest, form=COMPACT) -> a compact soft-label frame (compact form)

Top-k is taken on the float32 logits and only its values are cast, so the indices do not depend on the output
dtype and one entry holds them for every dtype. The compact form (`services.formats.soft_labels`) is taken on
the float32 logits too, whatever the output dtype, and is the same entry `ekd warm` writes. A teacher without
`weights_sha256` (random initialisation) is never cached: its identity does not pin its weights, and neither
is a request with `bypass_cache` (an audit's fresh forward pass).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import grpc
import torch

from services._generated import teacher_pb2
from services.cache import (
    COMPACT,
    FULL,
    Outcome,
    OutputEntries,
    TeacherOutputStore,
    ValueSpec,
    guarded,
    input_digests,
)
from services.cache.writer import BackgroundWriter
from services.core.contract import (
    ADMISSION_RETRY_MILLISECONDS,
    LOGITS,
    MAX_NAME_LENGTH,
    MAX_OUTPUTS_PER_REQUEST,
    MAX_REQUEST_ID_LENGTH,
    MAX_TEACHERS_PER_REQUEST,
    OUTPUT_DTYPES,
    RETRY_PUSHBACK_METADATA,
)
from services.formats.codec import (
    DTYPES,
    DTYPES_BY_PROTO_NAME,
    PROTO_DTYPE_NAMES,
    tensor_from_bytes,
    tensor_to_bytes,
)
from services.formats.soft_labels import CompactLogits, compress, entries_that_fit, frame_bytes, frames_tensor
from services.rpc.backends import BackendUnavailableError, TeacherBackend
from services.rpc.limits import DEFAULT_LIMITS, MESSAGE_FRAMING_BYTES, ServiceLimits
from services.rpc.metrics import NO_TEACHER, Metrics
from services.rpc.wire import ReceivedInferRequest
from services.teachers.spec import TeacherSpec

logger = logging.getLogger(__name__)

# Per Tensor of an InferResponse, room for its dtype, shape and length prefixes (the message's own is
# MESSAGE_FRAMING_BYTES).
_TENSOR_FRAMING_BYTES = 64

_INDICES_DTYPE = "int64"

# Long enough for any backlog of writes: each write either finishes, or fails within the store's short
# timeouts and opens the breaker, after which the rest are skipped at once.
DEFAULT_CACHE_DRAIN_SECONDS = 30.0

# Error messages go back as gRPC trailing metadata, whose size is limited (8 KB by default): a message lists
# at most this many names, each cut to this many characters, and is cut to this many characters in all.
_LISTED_NAMES = 8
_LISTED_NAME_CHARS = 64
MAX_ERROR_MESSAGE_CHARS = 1024


class _RequestError(Exception):
    """Ends an RPC with `code` and `message` (the status the client sees); `retry_after_ms` marks a refusal
    that may be retried (sent as RETRY_PUSHBACK_METADATA)."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms


@dataclass(frozen=True)
class _Hosted:
    """A hosted teacher as the servicer needs it: spec and tap shapes, read once from the backend."""

    spec: TeacherSpec
    feature_shapes: dict[str, tuple[int, ...]]  # (channels, height, width): `_hosted` checks

    @property
    def outputs(self) -> list[str]:
        return [LOGITS, *self.spec.taps]


@dataclass(frozen=True)
class _Part:
    """One tensor of one sample's answer: what it is, its cache key fields and its per-sample shape.

    `role` is "output" (a logits or tap map entry), "top_k_values", "top_k_indices" or "compact" (the
    compact soft-label frames of the logits: uint8 [frame bytes] a sample, cached as `CompactLogits`).
    """

    role: str
    output: str
    dtype: str
    top_k: int
    shape: tuple[int, ...]
    num_classes: int = 0  # of the compact part

    @property
    def sample_bytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize

    @property
    def form(self) -> str:
        return COMPACT if self.role == "compact" else FULL

    def entries(self, identity: str) -> OutputEntries:
        """Where this part of the teacher `identity`'s answers is cached."""
        return OutputEntries.of(identity, self.output, self.dtype, logits_form=self.form, top_k=self.top_k)

    @property
    def spec(self) -> ValueSpec:
        """What a cached value of this part must be."""
        return ValueSpec.of(self.form, self.dtype, num_classes=self.num_classes, shape=self.shape)


@dataclass(frozen=True)
class _Plan:
    """A validated Infer request."""

    teachers: list[str]
    outputs: list[str]
    images: torch.Tensor
    parts: dict[str, list[_Part]]
    chunk_sizes: dict[str, int]
    request_id: str
    bypass_cache: bool = False
    # The request's forward passes, each running on until it ends even when the RPC is cancelled; the request
    # stays admitted until they have (see `Infer`).
    computing: list[asyncio.Future] = field(default_factory=list)


class TeacherServicer:
    """Serves the teachers of `backend`, caching their outputs in `store` (None: no cache).

    Its `Infer` takes a `ReceivedInferRequest` (`services.rpc.wire`: the request and a view of its image
    bytes), so `services.rpc.server` registers it with `parse_infer_request` as the request deserializer.

    The hosted teachers are read from the backend once, here. `limits.max_message_bytes` must equal the
    server's gRPC message length limits (`services.rpc.server.create_server` sets both). Beyond
    `limits.max_concurrent_rpcs` or `limits.max_inflight_request_bytes` an Infer ends at once with
    RESOURCE_EXHAUSTED. (ListTeachers, answered from memory without waiting, needs no such bound.)
    """

    def __init__(
        self,
        backend: TeacherBackend,
        store: TeacherOutputStore | None,
        metrics: Metrics,
        *,
        limits: ServiceLimits = DEFAULT_LIMITS,
    ) -> None:
        self._backend = backend
        self._store = guarded(store) if store is not None else None
        self.metrics = metrics
        self.limits = limits
        # Admission state, touched only on the event loop's thread (RPC entry and exit), so unlocked.
        self._active_rpcs = 0
        self._inflight_request_bytes = 0
        self._hosted = {
            name: _hosted(name, spec, backend.feature_shapes(name))
            for name, spec in sorted(backend.specs().items())
        }
        if not self._hosted:
            raise ValueError("the backend hosts no teachers")
        self._teacher_list = self._list_teachers_response()
        self._cache_writer = (
            BackgroundWriter(self._store, on_written=self._cache_written) if self._store is not None else None
        )

    # ---- RPCs -----------------------------------------------------------------------------------------

    async def ListTeachers(
        self, request: teacher_pb2.ListTeachersRequest, context: grpc.aio.ServicerContext
    ) -> teacher_pb2.ListTeachersResponse:
        with self.metrics.request_seconds.labels("ListTeachers").time():
            return self._teacher_list

    async def Infer(
        self, request: ReceivedInferRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[teacher_pb2.InferResponse]:
        started = time.perf_counter()
        message = request.message
        requested = set(message.teachers)
        labels = [name for name in self._hosted if name in requested] or [NO_TEACHER]
        for label in labels:
            self.metrics.requests.labels(label).inc()
        failure = None
        admitted = False
        plan = None
        try:
            self._admit(request.wire_bytes)
            admitted = True
            plan = self._validate(request)
            async for response in self._stream(plan):
                yield response
        except _RequestError as error:
            # Without its traceback: through this frame, it would hold the request (a cycle that only the
            # garbage collector's rare full passes break, keeping refused requests' bytes for minutes).
            failure = error.with_traceback(None)
            for label in labels:
                self.metrics.request_errors.labels(label, error.code.name).inc()
        finally:
            if admitted:
                self._release_when_computed(plan.computing if plan is not None else [], request.wire_bytes)
            # Before the status is sent, so that a client that has the status sees the metrics too.
            self.metrics.request_seconds.labels("Infer").observe(time.perf_counter() - started)
        if failure is not None:
            _set_status(context, failure.code, failure.message, failure.retry_after_ms)

    # ---- admission ------------------------------------------------------------------------------------

    def _admit(self, request_bytes: int) -> None:
        """Count an Infer of `request_bytes` request bytes as running, or refuse it: RESOURCE_EXHAUSTED."""
        if self._active_rpcs >= self.limits.max_concurrent_rpcs:
            raise _RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server is running its maximum of {self.limits.max_concurrent_rpcs} concurrent requests "
                f"(max_concurrent_rpcs); retry later",
                retry_after_ms=ADMISSION_RETRY_MILLISECONDS,
            )
        if self._inflight_request_bytes + request_bytes > self.limits.max_inflight_request_bytes:
            raise _RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server is processing {self._inflight_request_bytes} bytes of requests; this one's "
                f"{request_bytes} would exceed "
                f"max_inflight_request_bytes={self.limits.max_inflight_request_bytes}; "
                f"retry later",
                retry_after_ms=ADMISSION_RETRY_MILLISECONDS,
            )
        self._active_rpcs += 1
        self._inflight_request_bytes += request_bytes

    def _release(self, request_bytes: int) -> None:
        self._active_rpcs -= 1
        self._inflight_request_bytes -= request_bytes

    def _release_when_computed(self, computing: list[asyncio.Future], request_bytes: int) -> None:
        """Release the request's admission now, or, while forward passes it started still run (the RPC was
        cancelled or failed mid-way: they run on in their threads), when the last of them ends; so that a
        caller cannot pile up abandoned work beyond the caps by cancelling. Runs on the event loop, as do the
        futures' callbacks."""
        running = [future for future in computing if not future.done()]
        if not running:
            self._release(request_bytes)
            return
        remaining = len(running)

        def one_done(_: asyncio.Future) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                self._release(request_bytes)

        for future in running:
            future.add_done_callback(one_done)

    # ---- validation -----------------------------------------------------------------------------------

    def _validate(self, received: ReceivedInferRequest) -> _Plan:
        request = received.message
        hosted_names = _listed(self._hosted, quoted=False)
        teachers = list(request.teachers)
        if not teachers:
            raise _RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, f"no teachers requested; hosted teachers: {hosted_names}"
            )
        _check_names(teachers, "teachers", MAX_TEACHERS_PER_REQUEST)
        unknown = [name for name in teachers if name not in self._hosted]
        if unknown:
            raise _RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"unknown teachers {_listed(unknown)}; hosted teachers: {hosted_names}",
            )
        self._check_identities(request.expected_identities, teachers)
        outputs = list(request.outputs) or [LOGITS]
        _check_names(outputs, "outputs", MAX_OUTPUTS_PER_REQUEST)
        if len(request.request_id) > MAX_REQUEST_ID_LENGTH:
            raise _RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request_id of {len(request.request_id)} characters; "
                f"at most {MAX_REQUEST_ID_LENGTH} allowed",
            )
        for name in teachers:
            available = self._hosted[name].outputs
            missing = [output for output in outputs if output not in available]
            if missing:
                raise _RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"teacher {name!r} has no outputs {_listed(missing)}; available outputs of "
                    f"{name!r}: {_listed(available, quoted=False)}",
                )
        dtype = self._output_dtype(request.output_dtype)
        top_k = request.top_k
        fewest_classes = min(self._hosted[name].spec.num_classes for name in teachers)
        if top_k > fewest_classes:
            raise _RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"top_k={top_k} exceeds the number of classes; allowed: 0 (full logits) to "
                f"{fewest_classes} (the fewest classes of the requested teachers)",
            )
        compact = self._compact_logits(request.logits_form, top_k)
        images = self._images(request.images, received.image_data, teachers)
        top_k = top_k if LOGITS in outputs else 0
        parts = {name: self._parts(self._hosted[name], outputs, dtype, top_k, compact) for name in teachers}
        chunk_size = request.chunk_size or self.limits.default_chunk_size
        chunk_sizes = {name: self._fitting_chunk_size(name, parts[name], chunk_size) for name in teachers}
        return _Plan(teachers, outputs, images, parts, chunk_sizes, request.request_id, request.bypass_cache)

    def _check_identities(self, expected: Mapping[str, str], teachers: list[str]) -> None:
        """FAILED_PRECONDITION when a teacher is not the one the caller listed (another deployment now)."""
        if len(expected) > len(teachers) or not set(expected) <= set(teachers):
            raise _RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"expected_identities names {_listed(sorted(set(expected) - set(teachers)))}, not among the "
                "requested teachers",
            )
        changed = [
            name for name, identity in expected.items() if self._hosted[name].spec.identity != identity
        ]
        if changed:
            raise _RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"teachers {_listed(changed)} are not the ones expected (another identity: other weights, "
                "preprocessing or architecture under the same name); list the teachers again (a training run "
                "must start again: it cannot mix two teachers' targets)",
            )

    @staticmethod
    def _compact_logits(logits_form: int, top_k: int) -> bool:
        """Whether the request asks for the logits in the compact form."""
        if logits_form not in (teacher_pb2.LOGITS_FORM_FULL, teacher_pb2.LOGITS_FORM_COMPACT):
            raise _RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown logits_form {logits_form}; allowed: LOGITS_FORM_FULL, LOGITS_FORM_COMPACT",
            )
        compact = logits_form == teacher_pb2.LOGITS_FORM_COMPACT
        if compact and top_k:
            raise _RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"top_k={top_k} with logits_form LOGITS_FORM_COMPACT; the compact form keeps its own "
                "largest logits: ask for top_k 0",
            )
        return compact

    def _output_dtype(self, value: int) -> str:
        if value == teacher_pb2.DTYPE_UNSPECIFIED:
            return self.limits.default_dtype
        name = DTYPES_BY_PROTO_NAME.get(_proto_dtype_name(value))
        if name not in OUTPUT_DTYPES:
            allowed = ", ".join(PROTO_DTYPE_NAMES[dtype] for dtype in OUTPUT_DTYPES)
            raise _RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"output_dtype {_proto_dtype_name(value)} is not allowed; allowed: {allowed} "
                f"(or DTYPE_UNSPECIFIED for the server default, "
                f"{PROTO_DTYPE_NAMES[self.limits.default_dtype]})",
            )
        return name

    def _images(self, images: teacher_pb2.Tensor, data: memoryview, teachers: Sequence[str]) -> torch.Tensor:
        channels = {name: self._hosted[name].spec.preprocessing.in_chans for name in teachers}
        if len(set(channels.values())) > 1:
            raise _RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the requested teachers take different channel counts {channels}; "
                f"ask them in separate requests",
            )
        expected_channels = channels[teachers[0]]
        sizes = ", ".join(
            f"{name!r} resizes to {self._hosted[name].spec.preprocessing.input_size}px" for name in teachers
        )
        spec = (
            f"expected images uint8 [B, {expected_channels}, H, W] "
            f"with 1 <= B <= {self.limits.max_batch_size} "
            f"and H, W >= 1, as B*{expected_channels}*H*W bytes of raw pixels ({sizes})"
        )
        shape = list(images.shape)
        problem = None
        if images.dtype != teacher_pb2.UINT8:
            problem = f"dtype {_proto_dtype_name(images.dtype)}"
        elif len(shape) != 4:
            problem = f"{len(shape)} dimensions (shape {shape})"
        elif any(dim < 0 for dim in shape):
            problem = f"a negative dimension (shape {shape})"
        elif shape[1] != expected_channels:
            problem = f"{shape[1]} channels (shape {shape})"
        elif shape[0] == 0 or shape[2] == 0 or shape[3] == 0:
            problem = f"an empty batch (shape {shape})"
        if problem:
            raise _RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{spec}; got {problem}")
        if shape[0] > self.limits.max_batch_size:
            raise _RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"batch of {shape[0]} images exceeds max_batch_size={self.limits.max_batch_size}; "
                f"split it into requests of at most {self.limits.max_batch_size} images",
            )
        if len(data) != math.prod(shape):
            raise _RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{spec}; got {len(data)} bytes for shape {shape}, which needs {math.prod(shape)}",
            )
        # A view of the received bytes, not a copy: nothing on the serving path writes to the images.
        return tensor_from_bytes(data, "uint8", shape, copy=False)

    @staticmethod
    def _parts(hosted: _Hosted, outputs: Sequence[str], dtype: str, top_k: int, compact: bool) -> list[_Part]:
        parts = []
        for output in outputs:
            if output != LOGITS:
                parts.append(_Part("output", output, dtype, 0, hosted.feature_shapes[output]))
            elif compact:
                classes = hosted.spec.num_classes
                size = frame_bytes(classes, entries_that_fit(classes))
                parts.append(_Part("compact", LOGITS, "uint8", 0, (size,), num_classes=classes))
            elif top_k == 0:
                parts.append(_Part("output", LOGITS, dtype, 0, (hosted.spec.num_classes,)))
            else:
                parts.append(_Part("top_k_values", LOGITS, dtype, top_k, (top_k,)))
                parts.append(_Part("top_k_indices", LOGITS, _INDICES_DTYPE, top_k, (top_k,)))
        return parts

    def _fitting_chunk_size(self, teacher: str, parts: Sequence[_Part], chunk_size: int) -> int:
        """The requested chunk size, shrunk until a message of that many samples fits the size limit."""
        framing = (
            MESSAGE_FRAMING_BYTES
            + len(teacher.encode())
            + sum(_TENSOR_FRAMING_BYTES + len(part.output.encode()) for part in parts)
        )
        sample_bytes = sum(part.sample_bytes for part in parts) + 1  # + its `cached` flag
        fitting = (self.limits.max_message_bytes - framing) // sample_bytes
        if fitting < 1:
            raise _RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"one sample's outputs of teacher {teacher!r} take {sample_bytes} "
                f"bytes, more than fit in max_message_bytes={self.limits.max_message_bytes}; "
                f"request fewer outputs or a smaller output_dtype",
            )
        return min(chunk_size, fitting)

    # ---- computing and streaming ----------------------------------------------------------------------

    async def _stream(self, plan: _Plan) -> AsyncIterator[teacher_pb2.InferResponse]:
        cached_teachers = [name for name in plan.teachers if self._is_cached(name, plan)]
        digests = await asyncio.to_thread(input_digests, plan.images) if cached_teachers else None
        queue: asyncio.Queue[teacher_pb2.InferResponse | _RequestError | str] = asyncio.Queue()
        tasks = [
            asyncio.create_task(self._serve_teacher(name, plan, digests, queue)) for name in plan.teachers
        ]
        try:
            unfinished = set(plan.teachers)
            while unfinished:
                item = await queue.get()
                if isinstance(item, _RequestError):
                    raise item
                if isinstance(item, str):  # a teacher's name: it has sent everything
                    unfinished.discard(item)
                    continue
                self.metrics.served_bytes.labels(item.teacher).inc(item.ByteSize())
                yield item
        finally:
            for task in tasks:
                task.cancel()

    def _is_cached(self, name: str, plan: _Plan) -> bool:
        return (
            self._store is not None
            and self._hosted[name].spec.weights_sha256 is not None
            and not plan.bypass_cache
        )

    async def _serve_teacher(
        self, name: str, plan: _Plan, digests: list[bytes] | None, queue: asyncio.Queue
    ) -> None:
        """Put teacher `name`'s messages on `queue`, then its name once they are all there (or an error)."""
        try:
            parts = plan.parts[name]
            batch = plan.images.shape[0]
            identity = self._hosted[name].spec.identity
            keys = (
                {part: part.entries(identity).keys(digests) for part in parts}
                if digests is not None and self._is_cached(name, plan)
                else None
            )
            found = await self._cache_get(name, parts, keys) if keys is not None else None
            hit = [
                found is not None and all(found[part][i] is not None for part in parts) for i in range(batch)
            ]
            misses = [i for i in range(batch) if not hit[i]]
            computed = await self._compute(name, plan, parts, misses) if misses else {}
            responses = await asyncio.to_thread(
                self._responses, name, plan, parts, found, computed, hit, misses
            )
            for response in responses:
                queue.put_nowait(response)
            if keys is not None and misses:
                self._cache_put(
                    name,
                    [(keys[part][i], computed[part][row]) for part in parts for row, i in enumerate(misses)],
                )
            queue.put_nowait(name)
        except BackendUnavailableError as error:
            logger.warning("teacher %r unavailable (request %r): %s", name, plan.request_id, error)
            queue.put_nowait(
                _RequestError(
                    grpc.StatusCode.UNAVAILABLE, f"teacher {name!r} is unavailable: {error}; retry later"
                )
            )
        except Exception as error:  # a failed forward pass fails this request, never the server
            logger.exception("teacher %r failed (request %r)", name, plan.request_id)
            queue.put_nowait(
                _RequestError(
                    grpc.StatusCode.INTERNAL, f"teacher {name!r} failed: {type(error).__name__}: {error}"
                )
            )

    async def _compute(
        self, name: str, plan: _Plan, parts: Sequence[_Part], misses: list[int]
    ) -> dict[_Part, torch.Tensor | CompactLogits]:
        """Forward the missed samples; every part of them as [len(misses), ...] tensors (compact parts as
        `CompactLogits` of len(misses) rows, what the cache stores)."""
        images = plan.images if len(misses) == plan.images.shape[0] else plan.images[misses]
        started = time.perf_counter()
        computing = asyncio.ensure_future(self._backend.infer(name, images, plan.outputs))
        computing.add_done_callback(_retrieve_exception)
        plan.computing.append(computing)
        outputs = await asyncio.shield(computing)
        self.metrics.inference_seconds.labels(name).observe(time.perf_counter() - started)
        self.metrics.batch_size.labels(name).observe(len(misses))
        hosted = self._hosted[name]
        for output in plan.outputs:
            sample_shape = (hosted.spec.num_classes,) if output == LOGITS else hosted.feature_shapes[output]
            expected = [len(misses), *sample_shape]
            if output not in outputs or list(outputs[output].shape) != expected:
                got = list(outputs[output].shape) if output in outputs else "nothing"
                raise RuntimeError(f"backend returned {got} for output {output!r}, expected shape {expected}")
        top_k = max(part.top_k for part in parts)
        # Taken on float32 so that the indices do not depend on the output dtype (see the module doc).
        top = torch.topk(outputs[LOGITS].float(), top_k, dim=1) if top_k else None
        computed: dict[_Part, torch.Tensor | CompactLogits] = {}
        for part in parts:
            if part.role == "output":
                computed[part] = outputs[part.output].to(DTYPES[part.dtype])
            elif part.role == "compact":
                computed[part] = compress(outputs[LOGITS].float())
            elif top is None:  # a top-k part has top_k > 0, so `top` is taken whenever there is one
                raise RuntimeError(f"no top-k taken for the {part.role} part of {part.output!r}")
            elif part.role == "top_k_values":
                computed[part] = top.values.to(DTYPES[part.dtype])
            else:
                computed[part] = top.indices
        return computed

    def _responses(
        self,
        name: str,
        plan: _Plan,
        parts: Sequence[_Part],
        found: dict[_Part, list[torch.Tensor | CompactLogits | None]] | None,
        computed: dict[_Part, torch.Tensor | CompactLogits],
        hit: list[bool],
        misses: list[int],
    ) -> list[teacher_pb2.InferResponse]:
        """The teacher's answer, cached and computed samples merged in input order, cut into chunks."""
        batch = len(hit)
        chunk_size = plan.chunk_sizes[name]
        computed_frames = _as_frames(parts, computed)
        # A hit has every part cached, so the values were found whenever a sample is a hit.
        found_frames = _as_frames(parts, found) if found is not None else {}
        whole: dict[_Part, torch.Tensor] = {}
        for part in parts:
            if not misses:
                whole[part] = torch.stack([row for row in found_frames[part] if row is not None])
            elif len(misses) == batch:
                whole[part] = computed_frames[part]
            else:
                merged = torch.empty((batch, *part.shape), dtype=DTYPES[part.dtype])
                for i, row in enumerate(found_frames[part]):
                    if hit[i] and row is not None:
                        merged[i] = row
                merged[misses] = computed_frames[part]
                whole[part] = merged
        responses = []
        for start in range(0, batch, chunk_size):
            end = min(start + chunk_size, batch)
            response = teacher_pb2.InferResponse(
                teacher=name, start=start, count=end - start, cached=hit[start:end]
            )
            for part in parts:
                if part.role == "output":
                    target = response.outputs[part.output]
                elif part.role == "compact":
                    target = response.compact_logits
                elif part.role == "top_k_values":
                    target = response.logits_top_k.values
                else:
                    target = response.logits_top_k.indices
                _fill_tensor(target, whole[part][start:end])
            responses.append(response)
        return responses

    # ---- cache ----------------------------------------------------------------------------------------

    async def _cache_get(
        self, name: str, parts: Sequence[_Part], keys: dict[_Part, list[bytes]]
    ) -> dict[_Part, list[torch.Tensor | CompactLogits | None]] | None:
        """The cached value of every key, None where missing, damaged or not of the part's dtype and shape
        (the store checks each against its part); None altogether when the cache failed or was skipped."""
        store = self._store
        if store is None:  # only asked for when the cache is on (`_is_cached`)
            return None
        flat_keys = [key for part in parts for key in keys[part]]
        batch = len(flat_keys) // len(parts)
        expected = [part.spec for part in parts for _ in range(batch)]
        try:
            lookup = await asyncio.to_thread(store.get_many, flat_keys, expected)
        except Exception:  # a bug in the cache: it only saves work, so compute instead, with the trace logged
            logger.exception("cache read for teacher %r failed, serving without the cache", name)
            self.metrics.cache_errors.labels(name, "get").inc()
            return None
        if lookup.outcome is not Outcome.DONE:
            self._count_cache_error(name, "get", lookup.outcome)
            return None
        found = {part: lookup.values[index * batch : (index + 1) * batch] for index, part in enumerate(parts)}
        hits = sum(value is not None for value in lookup.values)
        self.metrics.cache_hits.labels(name).inc(hits)
        self.metrics.cache_misses.labels(name).inc(len(flat_keys) - hits)
        self.metrics.cache_corrupt.labels(name).inc(lookup.corrupt)
        return found

    def _cache_put(self, name: str, items: list[tuple[bytes, torch.Tensor | CompactLogits]]) -> None:
        """Hand the computed values to the background writer and return at once (the answer is already on
        its way; a lost write costs one recomputation)."""
        store, writer = self._store, self._cache_writer
        if store is None or writer is None:  # only called when the cache is on (`_is_cached`): both are set
            return
        if not store.available:  # decided here, so the metrics move before the response ends
            self._count_cache_error(name, "put", Outcome.SKIPPED)
        elif not writer.submit(name, items):
            self.metrics.cache_errors.labels(name, "put").inc()
            self.metrics.cache_dropped_writes.labels(name).inc(len(items))

    def _cache_written(self, name: str, outcome: Outcome, values: int) -> None:
        if outcome is not Outcome.DONE:
            self._count_cache_error(name, "put", outcome)

    def _count_cache_error(self, name: str, operation: str, outcome: Outcome) -> None:
        """A cache read or write that did not happen (the guard logged why, once per outage)."""
        self.metrics.cache_errors.labels(name, operation).inc()
        if outcome is Outcome.SKIPPED:
            self.metrics.cache_skipped.labels(name, operation).inc()

    def wait_for_cache_writes(self, timeout_seconds: float = DEFAULT_CACHE_DRAIN_SECONDS) -> bool:
        """Block until every cache write handed over so far is done or given up (False if `timeout_seconds`
        passed first): before a graceful stop, or before reading the cache right after a request. Any thread
        may call it; on the event loop, call it through `asyncio.to_thread`."""
        return self._cache_writer.wait(timeout_seconds) if self._cache_writer is not None else True

    # ---- teacher list ---------------------------------------------------------------------------------

    def _list_teachers_response(self) -> teacher_pb2.ListTeachersResponse:
        output_dtypes = [teacher_pb2.DType.Value(PROTO_DTYPE_NAMES[dtype]) for dtype in OUTPUT_DTYPES]
        teachers = []
        for name, hosted in self._hosted.items():
            spec = hosted.spec
            preprocessing = spec.preprocessing
            teachers.append(
                teacher_pb2.TeacherInfo(
                    name=name,
                    architecture=spec.name,
                    num_classes=spec.num_classes,
                    identity=spec.identity,
                    weights_sha256=spec.weights_sha256 or "",
                    input=teacher_pb2.InputSpec(
                        channels=preprocessing.in_chans,
                        input_size=preprocessing.input_size,
                        mean=preprocessing.mean,
                        std=preprocessing.std,
                        dtype=teacher_pb2.UINT8,
                    ),
                    taps=[
                        teacher_pb2.Tap(name=tap, channels=channels, height=height, width=width)
                        for tap in spec.taps
                        for channels, height, width in [hosted.feature_shapes[tap]]
                    ],
                    output_dtypes=output_dtypes,
                )
            )
        return teacher_pb2.ListTeachersResponse(
            teachers=teachers,
            max_batch_size=self.limits.max_batch_size,
            max_message_bytes=self.limits.max_message_bytes,
        )


def _hosted(name: str, spec: TeacherSpec, feature_shapes: Mapping[str, Sequence[int]]) -> _Hosted:
    if set(feature_shapes) != set(spec.taps) or any(len(shape) != 3 for shape in feature_shapes.values()):
        raise ValueError(
            f"the backend gives teacher {name!r} feature shapes {feature_shapes}; expected "
            f"[channels, height, width] for each of its taps {list(spec.taps)}"
        )
    return _Hosted(spec, {tap: tuple(int(dim) for dim in shape) for tap, shape in feature_shapes.items()})


def _check_names(names: Sequence[str], field: str, most: int) -> None:
    """INVALID_ARGUMENT unless `names` holds at most `most` distinct names of at most MAX_NAME_LENGTH
    characters each; linear in the request's size, so a hostile request costs no more than reading it."""
    if len(names) > most:
        raise _RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, f"{len(names)} {field} requested; at most {most} per request"
        )
    too_long = [name for name in names if len(name) > MAX_NAME_LENGTH]
    if too_long:
        raise _RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{field} {_listed(too_long)} longer than {MAX_NAME_LENGTH} characters",
        )
    _reject_duplicates(names, field)


def _reject_duplicates(names: Sequence[str], field: str) -> None:
    seen: set[str] = set()
    duplicates: dict[str, None] = {}  # in order of first repetition
    for name in names:
        if name in seen:
            duplicates[name] = None
        seen.add(name)
    if duplicates:
        raise _RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"duplicate {field} {_listed(duplicates)}; name each at most once",
        )


def _listed(names: Iterable[str], *, quoted: bool = True) -> str:
    """`names` for an error message, "['x', 'y'] and 3 more" (or "x, y and 3 more" unquoted): at most
    _LISTED_NAMES of them, each cut to _LISTED_NAME_CHARS characters."""
    names = list(names)
    shown = [
        name if len(name) <= _LISTED_NAME_CHARS else name[:_LISTED_NAME_CHARS] + "..."
        for name in names[:_LISTED_NAMES]
    ]
    more = len(names) - len(shown)
    listed = str(shown) if quoted else ", ".join(shown)
    return listed + (f" and {more} more" if more > 0 else "")


def _set_status(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str, retry_after_ms: int | None = None
) -> None:
    """End the RPC with `code` and `message` (truncated) when its handler returns; `retry_after_ms` sends
    gRPC's retry pushback. Not `context.abort`: the exception it raises would sit in grpc's call state with
    the handler's frames, in a cycle that keeps the request's bytes until a full garbage collection."""
    context.set_code(code)
    context.set_details(_truncated(message))
    if retry_after_ms is not None:
        context.set_trailing_metadata(((RETRY_PUSHBACK_METADATA, str(retry_after_ms)),))


def _truncated(message: str) -> str:
    """`message` cut to MAX_ERROR_MESSAGE_CHARS characters: what a status detail may carry."""
    if len(message) <= MAX_ERROR_MESSAGE_CHARS:
        return message
    marker = " ... (truncated)"
    return message[: MAX_ERROR_MESSAGE_CHARS - len(marker)] + marker


@overload
def _as_frames(
    parts: Sequence[_Part], values: Mapping[_Part, torch.Tensor | CompactLogits]
) -> dict[_Part, torch.Tensor]: ...


@overload
def _as_frames(
    parts: Sequence[_Part], values: Mapping[_Part, list[torch.Tensor | CompactLogits | None]]
) -> dict[_Part, list[torch.Tensor | None]]: ...


def _as_frames(parts: Sequence[_Part], values: Mapping[_Part, Any]) -> dict[_Part, Any]:
    """`values` (part -> a batch, or a list of per-sample values) with compact parts' values as frames: a
    compact part's `CompactLogits` become uint8 tensors, the other parts' values are tensors already."""
    framed = dict(values)
    for part in parts:
        if part.role != "compact" or part not in values:
            continue
        value = values[part]
        framed[part] = (
            frames_tensor(value)
            if isinstance(value, CompactLogits)
            else [None if row is None else frames_tensor(row)[0] for row in value]
        )
    return framed


def _retrieve_exception(future: asyncio.Future) -> None:
    """Mark a forward's failure as seen: the awaiting RPC may be gone (it reports its own failures)."""
    if not future.cancelled():
        future.exception()


def _proto_dtype_name(value: int) -> str:
    try:
        return teacher_pb2.DType.Name(value)
    except ValueError:
        return f"<unknown DType value {value}>"


def _fill_tensor(target: teacher_pb2.Tensor, tensor: torch.Tensor) -> None:
    dtype, shape, data = tensor_to_bytes(tensor)
    target.dtype = teacher_pb2.DType.Value(PROTO_DTYPE_NAMES[dtype])
    target.shape.extend(shape)
    target.data = data
