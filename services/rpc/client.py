"""TeacherClient: teacher outputs for a batch of uint8 images, from the shared output cache first and the
teacher service (proto/ekd/v1/teacher.proto) for the rest, returned in input order.

One `fetch` digests every image once, looks up every (teacher, output, image) key in ONE `get_many`, and sends
only the images a teacher missed to the service. Teachers whose miss sets and outputs are equal share an Infer
request. Requests are split under the server's `max_batch_size` and `max_message_bytes`, and the streamed
chunks are put back by (teacher, start) into the caller's order.

The client only reads the cache: the service writes every output it computes, under the same key
(`output_key(identity, output, output_dtype, top_k=0, digest)`, one value per image, no batch dimension), so a
second client, or a second epoch, finds it. Teachers with an empty `weights_sha256` (random weights) are never
looked up, because the service never caches them. The teacher list (identities included) is read once per
client, and every Infer request carries the identities listed (`expected_identities`): a service redeployed
with other weights under the same names refuses it, and the fetch fails with `TeacherServiceChanged` rather
than mix two teachers' targets.

The cache is read through a circuit breaker (`services.cache.guard`): one that fails or freezes costs one
short timeout, then nothing, and the service answers every pair until the cache answers again. A cached value
of the wrong dtype or shape is never used.

`submit` starts a fetch and returns a `PendingFetch`; up to `max_in_flight` Infer requests (of one fetch or
of several submitted ones) are outstanding at once, so that the service computes the next while this thread
reads the last, and each response stream is written into the results chunk by chunk as it arrives.

Every RPC has a deadline (`timeout_seconds`). UNAVAILABLE and refusals for load are retried with exponential
backoff, waiting at least the pause a refusal asks for (gRPC's retry pushback); so is DEADLINE_EXCEEDED for
ListTeachers, which is cheap and idempotent (an Infer that ran out of time is not repeated). A refusal for
load is RESOURCE_EXHAUSTED that does not say a size limit was exceeded: the servicer's admission caps (with
pushback) and gRPC's own concurrent-RPC limit (without) alike. Beyond the retries it is
`TeacherServiceUnavailable`, which a trainer waits out like an outage. Other status codes raise
`TeacherServiceError` at once.

Thread safety: a TeacherClient is meant for one thread at a time (its stats and the cached teacher list are
unguarded); give each thread that fetches, e.g. a prefetching worker, its own client.
"""

from __future__ import annotations

import functools
import math
import re
import threading
import uuid
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TypeVar, cast

import grpc
import torch
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential
from tenacity.wait import wait_base

from services._generated import TEACHER_SERVICE_FULL_NAME, teacher_pb2, teacher_pb2_grpc
from services.cache import (
    COMPACT,
    FORMS,
    FULL,
    GuardedStore,
    Outcome,
    OutputEntries,
    TeacherOutputStore,
    guarded,
    input_digests,
    stored_form,
)
from services.core.contract import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_MESSAGE_BYTES,
    LOGITS,
    OUTPUT_DTYPES,
    RETRY_PUSHBACK_METADATA,
)
from services.core.errors import UserError
from services.formats.codec import (
    DTYPES_BY_PROTO_NAME,
    PROTO_DTYPE_NAMES,
    CodecError,
    CorruptValueError,
    decode_into,
    tensor_from_bytes,
)
from services.formats.soft_labels import (
    CompactLogits,
    entries_that_fit,
    frame_bytes,
    frames_tensor,
    from_frames,
)
from services.rpc.security import ClientSecurity
from services.rpc.wire import OutgoingInferRequest, serialize_infer_request

# Bytes an InferRequest may gain beyond its measured form without images once B images go in: the varints of
# the batch dimension, of the image bytes' length and of the images field's length (each at most 4 more).
_IMAGE_FIELD_OVERHEAD_BYTES = 16
# gRPC ends each call at its deadline; past the deadline by this much, the client cancels a stream itself: a
# backstop for a deadline event that never arrives (a stream was seen waiting 18 minutes past its deadline on
# a loaded machine, after its server closed mid-stream). The cancelled call reads as CANCELLED, an outage.
_DEADLINE_BACKSTOP_SECONDS = 10.0

_Result = TypeVar("_Result")


class TeacherServiceError(RuntimeError):
    """A teacher-service call failed: the message names the address, the RPC, the status code and the server's
    detail."""

    def __init__(self, message: str, *, address: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.address = address
        self.code = code


class TeacherServiceUnavailable(TeacherServiceError, UserError):
    """The teacher service could not be reached at its address, or refused the call for load, even after the
    bounded retries."""


class TeacherServiceChanged(TeacherServiceError, UserError):
    """The teacher service came back from an outage hosting other teachers under the names in use."""


@dataclass(frozen=True)
class TeacherInput:
    """The images a teacher expects (proto `InputSpec`): `channels`, and the square `input_size` it resizes to
    before normalizing with `mean` and `std`; `dtype` is what the images must be ("uint8")."""

    channels: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dtype: str


@dataclass(frozen=True)
class TeacherDescription:
    """One hosted teacher as ListTeachers describes it; `taps` maps each tap to its per-sample (C, H, W)."""

    name: str
    architecture: str
    num_classes: int
    identity: str
    weights_sha256: str
    input: TeacherInput
    taps: dict[str, tuple[int, int, int]] = field(hash=False)
    output_dtypes: tuple[str, ...]

    @property
    def outputs(self) -> tuple[str, ...]:
        """Every output name the teacher can return."""
        return (LOGITS, *self.taps)

    @property
    def cached(self) -> bool:
        """Whether the service caches this teacher's outputs: only for weights loaded from a file."""
        return bool(self.weights_sha256)

    def output_shape(self, output: str) -> tuple[int, ...]:
        """The per-sample shape of an output: (num_classes,) for logits, (C, H, W) for a tap."""
        return (self.num_classes,) if output == LOGITS else self.taps[output]

    def wire_shape(self, output: str, logits_form: str) -> tuple[int, ...]:
        """The per-sample shape of an output on the wire: `output_shape`, or (frame bytes,) for the logits in
        the compact form."""
        if stored_form(output, logits_form) == COMPACT:
            return (frame_bytes(self.num_classes, entries_that_fit(self.num_classes)),)
        return self.output_shape(output)

    @classmethod
    def from_proto(cls, info: teacher_pb2.TeacherInfo) -> TeacherDescription:
        return cls(
            name=info.name,
            architecture=info.architecture,
            num_classes=info.num_classes,
            identity=info.identity,
            weights_sha256=info.weights_sha256,
            input=TeacherInput(
                channels=info.input.channels,
                input_size=info.input.input_size,
                mean=tuple(info.input.mean),
                std=tuple(info.input.std),
                dtype=_dtype_name(info.input.dtype),
            ),
            taps={tap.name: (tap.channels, tap.height, tap.width) for tap in info.taps},
            output_dtypes=tuple(_dtype_name(dtype) for dtype in info.output_dtypes),
        )


@dataclass(frozen=True)
class ClientStats:
    """Totals since the client was made. `samples` counts images passed to `fetch`; `cache_hits`,
    `cache_misses` and `remote_samples` count (teacher, image) pairs: a hit has every requested output in the
    cache, a miss lacks one, and remote pairs were answered by the service (the misses plus every pair not
    looked up: no store, or a teacher without weights_sha256). `cache_unavailable` counts the pairs that were
    to be looked up but the cache failed or was skipped (its circuit breaker open: `services.cache.guard`),
    so the service answered them; they are neither hits nor misses. `corrupt` counts cached values found
    damaged, forged or of the wrong dtype or shape (deleted, answered by the service). `requests` counts Infer
    requests answered; `retries` counts repeated attempts of any RPC."""

    samples: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_unavailable: int = 0
    cache_corrupt: int = 0
    remote_samples: int = 0
    requests: int = 0
    retries: int = 0


@dataclass(frozen=True)
class _ServiceLimits:
    teachers: dict[str, TeacherDescription]
    max_batch_size: int
    max_message_bytes: int


@dataclass(eq=False)
class _Flight:
    """One Infer request of a submitted fetch: sent when its turn comes, its stream written into the fetch's
    results. `rows` are the fetch's batch positions of the request's images (a slice when consecutive)."""

    fetch: PendingFetch
    request: OutgoingInferRequest
    request_id: str
    rows: slice | torch.Tensor
    teachers: list[str]
    outputs: list[str]
    count: int
    logits_form: str
    bypass_cache: bool
    call: Iterator[teacher_pb2.InferResponse] | None = None
    error: TeacherServiceError | None = None
    done: bool = False


class PendingFetch:
    """A fetch submitted with `TeacherClient.submit`; `result()` waits for its outputs."""

    def __init__(self, client: TeacherClient, results: dict[str, dict[str, torch.Tensor]]) -> None:
        self._client = client
        # The result tensors, written as the responses land: complete once `result()` has returned.
        self.results = results
        self.flights: list[_Flight] = []

    def result(self) -> dict[str, dict[str, torch.Tensor | CompactLogits]]:
        """teacher -> output -> float32 [B, ...] (or `CompactLogits` of B rows) in input order, as
        `TeacherClient.fetch` returns; raises the error of the first of its requests that failed."""
        self._client._land(self)
        for flight in self.flights:
            if flight.error is not None:
                raise flight.error
        landed: dict[str, dict[str, torch.Tensor | CompactLogits]] = {}
        for teacher, outputs in self.results.items():
            landed[teacher] = dict(outputs)
            frames = outputs.get(LOGITS)
            if isinstance(frames, torch.Tensor) and frames.dtype == torch.uint8:  # the compact form
                try:
                    landed[teacher][LOGITS] = from_frames(frames)
                except CorruptValueError as error:
                    raise TeacherServiceError(
                        f"teacher service at {self._client.address} answered damaged compact logits: {error}",
                        address=self._client.address,
                    ) from error
        return landed


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        described = (
            f"{images.dtype} with shape {tuple(images.shape)}"
            if isinstance(images, torch.Tensor)
            else type(images).__name__
        )
        raise ValueError(f"images must be a uint8 [B, C, H, W] batch; got {described}")
    if images.shape[0] == 0:
        raise ValueError(f"images must hold at least one sample; got shape {tuple(images.shape)}")


def _chunk_rows(rows: slice | torch.Tensor, start: int, count: int) -> slice | torch.Tensor:
    """The fetch's rows of a request's samples start .. start + count - 1."""
    if isinstance(rows, slice):
        return slice(rows.start + start, rows.start + start + count)
    return rows[start : start + count]


def _compact(output: str, logits_form: str) -> bool:
    """Whether `output` travels and is cached in the compact form."""
    return stored_form(output, logits_form) == COMPACT


def _dtype_name(proto_dtype: int) -> str:
    return DTYPES_BY_PROTO_NAME[teacher_pb2.DType.Name(proto_dtype)]


def _proto_dtype(name: str) -> teacher_pb2.DType:
    return teacher_pb2.DType.Value(PROTO_DTYPE_NAMES[name])


# RESOURCE_EXHAUSTED also says that a message is too large (gRPC's "larger than max") or a request exceeds the
# servicer's max_batch_size or max_message_bytes: the same refusal every time, never a busy server's.
_SIZE_REFUSAL = re.compile(r"larger than max|max_batch_size|max_message_bytes")


def _pushback_seconds(error: grpc.RpcError) -> float | None:
    """The pause a refusal asks for before a retry (RETRY_PUSHBACK_METADATA), None when it names none."""
    for key, value in error.trailing_metadata() or ():
        if key == RETRY_PUSHBACK_METADATA:
            try:
                return max(0, int(value)) / 1000
            except ValueError:
                return None
    return None


def _refused_for_load(error: grpc.RpcError) -> bool:
    """Whether the server refused the call because it is busy, not because of the request: RESOURCE_EXHAUSTED
    with retry pushback (the servicer's admission caps) or without a size limit named (gRPC's concurrent-RPC
    limit, which answers every RPC, ListTeachers included, while all its slots are held)."""
    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return False
    return _pushback_seconds(error) is not None or not _SIZE_REFUSAL.search(error.details() or "")


def _retryable(codes: Collection[grpc.StatusCode]) -> Callable[[BaseException], bool]:
    """Whether a failed call may be repeated: one of `codes`, or a refusal for load."""

    def retryable(error: BaseException) -> bool:
        if not isinstance(error, grpc.RpcError):
            return False
        return error.code() in codes or _refused_for_load(error)

    return retryable


class _WaitAtLeastPushback(wait_base):
    """`backoff`, or the pause the last refusal asked for when that is longer."""

    def __init__(self, backoff: wait_base) -> None:
        self.backoff = backoff

    def __call__(self, retry_state: RetryCallState) -> float:
        pause = self.backoff(retry_state)
        error = retry_state.outcome.exception() if retry_state.outcome is not None else None
        if isinstance(error, grpc.RpcError) and (pushback := _pushback_seconds(error)) is not None:
            return max(pause, pushback)
        return pause


class TeacherClient:
    """Fetches teacher outputs for uint8 images: cache first, misses over gRPC, results in input order.

    `store` is read only (through `guarded(store)`) and not closed by the client. `output_dtype` is the wire
    dtype and the dtype in the cache keys (fp16 by default, what the service caches); `fetch` returns float32
    either way. `retries` is the number of repeated attempts after the first (so at most retries + 1), waiting
    `backoff_seconds`, then twice that, and so on. `max_request_samples` caps the images per Infer request
    below the server's limits. `max_in_flight` is how many Infer requests may be outstanding at once, across
    the fetches `submit` started: more than one lets the service batch and compute the next request while
    this one streams back.
    `security` is the channel's TLS and bearer token (`services.rpc.security`); None reads them from the EKD_*
    environment variables, and with none set the channel is insecure and sends no token.
    """

    def __init__(
        self,
        address: str,
        *,
        store: TeacherOutputStore | GuardedStore | None = None,
        output_dtype: str = "float16",
        timeout_seconds: float = 60.0,
        retries: int = 3,
        backoff_seconds: float = 0.2,
        max_request_samples: int | None = None,
        max_in_flight: int = 1,
        security: ClientSecurity | None = None,
    ) -> None:
        if not address:
            raise ValueError("address must be a non-empty host:port")
        if output_dtype not in OUTPUT_DTYPES:
            raise ValueError(f"output_dtype must be one of {', '.join(OUTPUT_DTYPES)}; got {output_dtype!r}")
        if not timeout_seconds > 0:
            raise ValueError(f"timeout_seconds must be positive; got {timeout_seconds!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a non-negative int; got {retries!r}")
        if backoff_seconds < 0:
            raise ValueError(f"backoff_seconds must be >= 0; got {backoff_seconds!r}")
        if max_request_samples is not None and max_request_samples < 1:
            raise ValueError(f"max_request_samples must be at least 1 or None; got {max_request_samples!r}")
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise ValueError(f"max_in_flight must be an int of at least 1; got {max_in_flight!r}")
        self.address = address
        self.store = guarded(store) if store is not None else None
        self.output_dtype = output_dtype
        self.timeout_seconds = timeout_seconds
        self.retries = retries
        self.backoff_seconds = backoff_seconds
        self.max_request_samples = max_request_samples
        self.max_in_flight = max_in_flight
        self._security = security if security is not None else ClientSecurity.from_environment()
        # Requests of submitted fetches: not yet sent, and sent but not yet consumed, both oldest first.
        self._waiting: deque[_Flight] = deque()
        self._in_flight: deque[_Flight] = deque()
        self._stats = ClientStats()
        self._limits: _ServiceLimits | None = None
        self._open_channel(DEFAULT_MAX_MESSAGE_BYTES)
        self._channel_message_bytes = DEFAULT_MAX_MESSAGE_BYTES

    # --- public -----------------------------------------------------------------------------------------

    def teachers(self) -> dict[str, TeacherDescription]:
        """Every teacher the service hosts, by name (ListTeachers, asked once per client and again only when
        `fetch` names a teacher not in the list)."""
        return dict(self._service_limits().teachers)

    def fetch(
        self,
        images: torch.Tensor,
        teachers: Sequence[str],
        outputs: Sequence[str] | Mapping[str, Sequence[str]],
        *,
        logits_form: str = FULL,
        bypass_cache: bool = False,
    ) -> dict[str, dict[str, torch.Tensor | CompactLogits]]:
        """Outputs of `teachers` for uint8 images [B, C, H, W]: teacher -> output -> float32 [B, ...] in input
        order. `outputs` is one list of output names ("logits", tap names) for every teacher, or a mapping
        teacher -> list that names every teacher (an empty list returns {} for that teacher).
        `logits_form` COMPACT asks for the logits as compact soft-label frames
        (`services.formats.soft_labels`: at most 64 bytes a sample on the wire and in the cache, whatever
        `output_dtype`), returned as `CompactLogits`. `bypass_cache` reads nothing from the cache and asks the
        service for a fresh forward pass that it neither reads from nor writes to its cache (audits)."""
        return self.submit(
            images, teachers, outputs, logits_form=logits_form, bypass_cache=bypass_cache
        ).result()

    def submit(
        self,
        images: torch.Tensor,
        teachers: Sequence[str],
        outputs: Sequence[str] | Mapping[str, Sequence[str]],
        *,
        logits_form: str = FULL,
        bypass_cache: bool = False,
    ) -> PendingFetch:
        """`fetch`, started: the cache is read now and the Infer requests for the misses are sent as soon as
        fewer than `max_in_flight` are outstanding; `result()` of the returned `PendingFetch` gives what
        `fetch` returns. Submitting the next batches before asking for this one's result keeps the service
        busy while this thread does other work; results are consumed in submission order."""
        if logits_form not in FORMS:
            raise ValueError(f"logits_form must be one of {', '.join(FORMS)}; got {logits_form!r}")
        limits = self._limits_knowing(teachers)
        requested = self._requested_outputs(teachers, outputs, limits)
        _check_images(images)
        images = images.detach().cpu().contiguous()
        batch_size = images.shape[0]
        results = {
            teacher: {
                output: torch.empty(
                    batch_size,
                    *limits.teachers[teacher].wire_shape(output, logits_form),
                    dtype=torch.uint8 if _compact(output, logits_form) else torch.float32,
                )
                for output in names
            }
            for teacher, names in requested.items()
        }
        if bypass_cache:
            misses = {
                teacher: list(range(batch_size)) if names else [] for teacher, names in requested.items()
            }
        else:
            misses = self._read_cache(requested, images, limits, results, logits_form)

        # Teachers that miss the same images and want the same outputs share one request.
        groups: dict[tuple[tuple[int, ...], tuple[str, ...]], list[str]] = {}
        for teacher, missed in misses.items():
            if missed:
                groups.setdefault((tuple(missed), tuple(requested[teacher])), []).append(teacher)
        pending = PendingFetch(self, results)
        for (missed_rows, names), group_teachers in groups.items():
            per_request = self._samples_per_request(images, group_teachers, list(names), limits)
            # Every image missed (the cold case): slices of the batch, no gather.
            everything = len(missed_rows) == batch_size
            for first in range(0, len(missed_rows), per_request):
                count = min(per_request, len(missed_rows) - first)
                rows: slice | torch.Tensor = (
                    slice(first, first + count)
                    if everything
                    else torch.tensor(missed_rows[first : first + count])
                )
                request_images = images[rows]
                request_id = uuid.uuid4().hex
                pending.flights.append(
                    _Flight(
                        pending,
                        self._request(
                            group_teachers,
                            list(names),
                            request_images,
                            request_id=request_id,
                            logits_form=logits_form,
                            bypass_cache=bypass_cache,
                        ),
                        request_id,
                        rows,
                        group_teachers,
                        list(names),
                        count,
                        logits_form,
                        bypass_cache,
                    )
                )
        self._waiting.extend(pending.flights)
        self._send_waiting()
        self._count(samples=batch_size, remote_samples=sum(len(missed) for missed in misses.values()))
        return pending

    @property
    def stats(self) -> ClientStats:
        """A snapshot of the totals (see ClientStats)."""
        return self._stats

    def close(self) -> None:
        """Close the channel, cancelling requests still in flight (the store belongs to the caller)."""
        self._waiting.clear()
        self._in_flight.clear()
        self._channel.close()

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- fetch steps ------------------------------------------------------------------------------------

    def _limits_knowing(self, teachers: Sequence[str]) -> _ServiceLimits:
        """The service description, asked again once if it lacks one of `teachers` (the service may have
        been redeployed with more); a teacher still unknown is NOT_FOUND, as the service itself would say."""
        if isinstance(teachers, str):
            raise ValueError(f"teachers must be a list of teacher names; got the string {teachers!r}")
        if not teachers or len(set(teachers)) != len(teachers):
            raise ValueError(f"teachers must be a non-empty list of distinct names; got {list(teachers)}")
        limits = self._service_limits()
        if not set(teachers) <= set(limits.teachers):
            self._limits = None
            limits = self._service_limits()
        unknown = [teacher for teacher in teachers if teacher not in limits.teachers]
        if unknown:
            raise TeacherServiceError(
                f"teacher service at {self.address}: NOT_FOUND: no teacher named "
                f"{', '.join(map(repr, unknown))}; it hosts {', '.join(limits.teachers) or 'none'}",
                address=self.address,
                code=grpc.StatusCode.NOT_FOUND,
            )
        return limits

    def _requested_outputs(
        self,
        teachers: Sequence[str],
        outputs: Sequence[str] | Mapping[str, Sequence[str]],
        limits: _ServiceLimits,
    ) -> dict[str, list[str]]:
        """teacher -> its deduplicated output names in the caller's order, each one the teacher provides."""
        if isinstance(outputs, Mapping):
            if set(outputs) != set(teachers):
                raise ValueError(
                    f"the outputs mapping must name exactly the teachers {list(teachers)}; "
                    f"got {list(outputs)}"
                )
            per_teacher = {teacher: outputs[teacher] for teacher in teachers}
        else:
            per_teacher = {teacher: outputs for teacher in teachers}
        requested = {}
        for teacher, names in per_teacher.items():
            if isinstance(names, str):
                raise ValueError(
                    f"outputs for teacher {teacher!r} must be a list of output names; got the "
                    f"string {names!r} (did you mean [{names!r}]?)"
                )
            description = limits.teachers[teacher]
            unknown = [name for name in names if name not in description.outputs]
            if unknown:
                raise ValueError(
                    f"teacher {teacher!r} has no outputs {unknown}; it provides "
                    f"{', '.join(description.outputs)}"
                )
            if names and self.output_dtype not in description.output_dtypes:
                raise ValueError(
                    f"teacher {teacher!r} cannot return output_dtype {self.output_dtype!r}; it "
                    f"returns {', '.join(description.output_dtypes)}"
                )
            requested[teacher] = list(dict.fromkeys(names))
        return requested

    def _read_cache(
        self,
        requested: dict[str, list[str]],
        images: torch.Tensor,
        limits: _ServiceLimits,
        results: dict[str, dict[str, torch.Tensor]],
        logits_form: str,
    ) -> dict[str, list[int]]:
        """Fill in every (teacher, image) whose requested outputs are all in the store, with one multi-get
        that checks each value's dtype and shape against its output; return, per teacher, the batch positions
        the service must answer. Images are digested only when some teacher is looked up. A cache that fails,
        or is skipped while its breaker is open, answers nothing: the service answers every pair."""
        everything = list(range(images.shape[0]))
        misses = {teacher: everything if names else [] for teacher, names in requested.items()}
        store = self.store
        if store is None:  # nothing is looked up without a store
            return misses
        looked_up = [
            teacher for teacher, names in requested.items() if names and limits.teachers[teacher].cached
        ]
        if not looked_up:
            return misses
        digests = input_digests(images)
        keys, expected = [], []
        for teacher in looked_up:
            description = limits.teachers[teacher]
            for output in requested[teacher]:
                entries = OutputEntries.of(
                    description.identity, output, self.output_dtype, logits_form=logits_form
                )
                spec = entries.spec(
                    num_classes=description.num_classes, shape=description.output_shape(output)
                )
                keys += entries.keys(digests)
                expected += [spec] * len(digests)
        lookup = store.get_many(keys, expected)
        if lookup.outcome is not Outcome.DONE:  # the guard said so once; the service answers every pair
            self._count(cache_unavailable=len(looked_up) * len(digests))
            return misses
        values = iter(lookup.values)
        hits = 0
        for teacher in looked_up:
            by_output = {output: [next(values) for _ in digests] for output in requested[teacher]}
            hit = [i for i in everything if all(cached[i] is not None for cached in by_output.values())]
            if hit:
                positions = torch.tensor(hit)
                for output, cached in by_output.items():
                    # Every value of a hit is there, and of its key's kind (`expected` checked it).
                    found = [cached[i] for i in hit]
                    if _compact(output, logits_form):
                        parts = [value for value in found if isinstance(value, CompactLogits)]
                        results[teacher][output][positions] = frames_tensor(CompactLogits.cat(parts))
                    else:
                        tensors = [value for value in found if isinstance(value, torch.Tensor)]
                        results[teacher][output][positions] = torch.stack(tensors).float()
            hit_set = set(hit)
            misses[teacher] = [i for i in everything if i not in hit_set]
            hits += len(hit)
        self._count(
            cache_hits=hits, cache_misses=len(looked_up) * len(digests) - hits, cache_corrupt=lookup.corrupt
        )
        return misses

    def _samples_per_request(
        self, images: torch.Tensor, teachers: list[str], outputs: list[str], limits: _ServiceLimits
    ) -> int:
        """Most images one request may carry: within max_batch_size and max_request_samples, and with the
        serialized request under max_message_bytes."""
        bound = limits.max_batch_size
        if self.max_request_samples is not None:
            bound = min(bound, self.max_request_samples)
        sample_bytes = math.prod(images.shape[1:])
        empty = self._request(teachers, outputs, images[:0], request_id=uuid.uuid4().hex)
        room = limits.max_message_bytes - empty.byte_size() - _IMAGE_FIELD_OVERHEAD_BYTES
        if room < sample_bytes:
            raise ValueError(
                f"one image of shape {tuple(images.shape[1:])} ({sample_bytes} bytes) does not fit in a "
                f"request under the server's max_message_bytes={limits.max_message_bytes} at {self.address}"
            )
        return min(bound, room // sample_bytes)

    def _request(
        self,
        teachers: list[str],
        outputs: list[str],
        images: torch.Tensor,
        *,
        request_id: str,
        logits_form: str = FULL,
        bypass_cache: bool = False,
    ) -> OutgoingInferRequest:
        message = teacher_pb2.InferRequest(
            teachers=teachers,
            outputs=outputs,
            output_dtype=_proto_dtype(self.output_dtype),
            request_id=request_id,
            logits_form=(
                teacher_pb2.LOGITS_FORM_COMPACT if logits_form == COMPACT else teacher_pb2.LOGITS_FORM_FULL
            ),
            bypass_cache=bypass_cache,
            expected_identities={name: self._service_limits().teachers[name].identity for name in teachers},
        )
        return OutgoingInferRequest(message, images.contiguous())

    # --- requests in flight -----------------------------------------------------------------------------

    def _send_waiting(self) -> None:
        """Send waiting requests, oldest first, while fewer than `max_in_flight` are outstanding."""
        while self._waiting and len(self._in_flight) < self.max_in_flight:
            flight = self._waiting.popleft()
            flight.call = self._infer(flight.request, timeout=self.timeout_seconds)
            self._in_flight.append(flight)

    def _land(self, pending: PendingFetch) -> None:
        """Consume responses, oldest request first, until every request of `pending` is done: those of fetches
        submitted earlier land on the way (into their own results), as their streams are ahead in line."""
        while not all(flight.done for flight in pending.flights):
            self._send_waiting()
            flight = self._in_flight.popleft()
            try:
                self._call(
                    f"Infer (request {flight.request_id})",
                    functools.partial(self._consume, flight),
                    {grpc.StatusCode.UNAVAILABLE},
                )
            except TeacherServiceError as error:
                flight.error = error
            finally:
                flight.done = True
        self._send_waiting()

    def _consume(self, flight: _Flight) -> None:
        """Read one request's stream, writing each chunk into its fetch's results as it arrives, and check
        that the chunks cover every image of every teacher exactly once. A retry sends the request again and
        rewrites the same rows."""
        if flight.call is None:  # a retry: the first call failed
            flight.call = self._infer(flight.request, timeout=self.timeout_seconds)
        call, flight.call = flight.call, None
        backstop = threading.Timer(
            self.timeout_seconds + _DEADLINE_BACKSTOP_SECONDS, cast(grpc.RpcContext, call).cancel
        )
        backstop.daemon = True
        backstop.start()
        try:
            self._read_stream(flight, call)
        finally:
            backstop.cancel()
        self._count(requests=1)

    def _read_stream(self, flight: _Flight, call: Iterator[teacher_pb2.InferResponse]) -> None:
        covered = {teacher: torch.zeros(flight.count, dtype=torch.int32) for teacher in flight.teachers}
        limits = self._service_limits()
        for response in call:
            if response.teacher not in covered:
                raise self._malformed(
                    flight.request_id,
                    f"a chunk for teacher {response.teacher!r}, not one of {flight.teachers}",
                )
            self._check_chunk(response, flight)
            description = limits.teachers[response.teacher]
            rows = _chunk_rows(flight.rows, response.start, response.count)
            for name, message in self._chunk_outputs(response, flight):
                target = flight.fetch.results[response.teacher][name]
                self._write_output(target, rows, message, response, description, name, flight)
            covered[response.teacher][response.start : response.start + response.count] += 1
        for teacher, times in covered.items():
            if not bool((times == 1).all()):
                raise self._malformed(
                    flight.request_id,
                    f"the chunks of teacher {teacher!r} cover samples "
                    f"{times.tolist()} times each; each must be covered once",
                )

    def _check_chunk(self, response: teacher_pb2.InferResponse, flight: _Flight) -> None:
        if response.count < 1 or response.start + response.count > flight.count:
            raise self._malformed(
                flight.request_id,
                f"chunk start={response.start} count={response.count} outside "
                f"the request's {flight.count} samples",
            )
        if flight.bypass_cache and any(response.cached):
            # A server that ignores bypass_cache (one from before it) would let an audit compare the cache
            # with itself.
            raise self._malformed(
                flight.request_id, "cached samples in answer to a request to bypass the cache"
            )
        sent = sorted([*response.outputs, *([LOGITS] if response.HasField("compact_logits") else [])])
        if sent != sorted(flight.outputs) or (
            LOGITS in response.outputs and _compact(LOGITS, flight.logits_form)
        ):
            raise self._malformed(
                flight.request_id,
                f"chunk outputs {sent} (compact: {response.HasField('compact_logits')}), asked for "
                f"{flight.outputs} (compact: {flight.logits_form == COMPACT})",
            )

    def _chunk_outputs(
        self, response: teacher_pb2.InferResponse, flight: _Flight
    ) -> list[tuple[str, teacher_pb2.Tensor]]:
        """(output name, tensor message) of each output of a checked chunk."""
        outputs = list(response.outputs.items())
        if response.HasField("compact_logits"):
            outputs.append((LOGITS, response.compact_logits))
        return outputs

    def _write_output(
        self,
        target: torch.Tensor,
        rows: slice | torch.Tensor,
        message: teacher_pb2.Tensor,
        response: teacher_pb2.InferResponse,
        description: TeacherDescription,
        name: str,
        flight: _Flight,
    ) -> None:
        """Decode one output of a chunk into its rows of the fetch's result (float32, or uint8 frames of the
        compact form), after checking its dtype, shape and length against what the teacher gives."""
        request_id = flight.request_id
        expected = (response.count, *description.wire_shape(name, flight.logits_form))
        if tuple(message.shape) != expected:
            raise self._malformed(
                request_id,
                f"output {name!r} of teacher {response.teacher!r} has "
                f"shape {tuple(message.shape)}, expected {expected}",
            )
        try:
            dtype = _dtype_name(message.dtype)
            if isinstance(rows, slice):  # decoded straight into the result, converting on the way
                decode_into(target[rows], message.data, dtype, expected)
            else:
                target[rows] = tensor_from_bytes(message.data, dtype, expected).to(target.dtype)
        except (CodecError, KeyError, ValueError) as error:
            raise self._malformed(request_id, f"output {name!r}: {error}") from error

    def _malformed(self, request_id: str, problem: str) -> TeacherServiceError:
        return TeacherServiceError(
            f"teacher service at {self.address}: Infer (request {request_id}) answered a malformed stream: "
            f"{problem}",
            address=self.address,
        )

    # --- service description, channel, retries ----------------------------------------------------------

    def _service_limits(self) -> _ServiceLimits:
        if self._limits is None:
            request = teacher_pb2.ListTeachersRequest()
            response = self._call(
                "ListTeachers",
                lambda: self._stub.ListTeachers(request, timeout=self.timeout_seconds),
                {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED},
            )
            limits = _ServiceLimits(
                teachers={info.name: TeacherDescription.from_proto(info) for info in response.teachers},
                max_batch_size=response.max_batch_size or DEFAULT_MAX_BATCH_SIZE,
                max_message_bytes=response.max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES,
            )
            if limits.max_message_bytes != self._channel_message_bytes:
                # Responses up to the server's limit must be receivable: reopen the channel sized for them,
                # once the requests on the old one have landed.
                while self._in_flight or self._waiting:
                    self._land(self._in_flight[-1].fetch if self._in_flight else self._waiting[-1].fetch)
                self._channel.close()
                self._open_channel(limits.max_message_bytes)
                self._channel_message_bytes = limits.max_message_bytes
            self._limits = limits
        return self._limits

    def _open_channel(self, max_message_bytes: int) -> None:
        backoff_ms = max(1, round(self.backoff_seconds * 1000))
        channel = self._security.channel(
            self.address,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                # Reconnect on the same schedule as the retries, so that a service back up is found by the
                # next retry rather than after gRPC's default reconnect backoff (1 s growing to 120 s).
                ("grpc.initial_reconnect_backoff_ms", backoff_ms),
                ("grpc.max_reconnect_backoff_ms", backoff_ms * 2**self.retries),
            ],
        )
        self._channel = channel
        self._stub = teacher_pb2_grpc.TeacherServiceStub(channel)
        # Infer with the image bytes serialized straight from the tensor (services.rpc.wire), not via
        # protobuf.
        self._infer = channel.unary_stream(
            f"/{TEACHER_SERVICE_FULL_NAME}/Infer",
            request_serializer=serialize_infer_request,
            response_deserializer=teacher_pb2.InferResponse.FromString,
        )

    def _call(
        self, rpc: str, call: Callable[[], _Result], retry_codes: Collection[grpc.StatusCode]
    ) -> _Result:
        """Run `call`, repeating it with exponential backoff while it fails with one of `retry_codes` or a
        refusal for load (a busy server), waiting at least the pause the refusal asks for."""
        retryable = _retryable(retry_codes)
        attempts = Retrying(
            stop=stop_after_attempt(self.retries + 1),
            wait=_WaitAtLeastPushback(wait_exponential(multiplier=self.backoff_seconds)),
            retry=retry_if_exception(retryable),
            before_sleep=self._count_retry,
            reraise=True,
        )
        try:
            return attempts(call)
        except grpc.RpcError as error:
            code, details = error.code(), error.details()
            if retryable(error):
                raise TeacherServiceUnavailable(
                    f"teacher service at {self.address} unavailable: {rpc} failed {self.retries + 1} times, "
                    f"last with {code.name}: {details}",
                    address=self.address,
                    code=code,
                ) from error
            failed = (
                TeacherServiceChanged if code == grpc.StatusCode.FAILED_PRECONDITION else TeacherServiceError
            )
            raise failed(
                f"teacher service at {self.address}: {rpc} failed with {code.name}: {details}",
                address=self.address,
                code=code,
            ) from error

    def _count_retry(self, _: RetryCallState) -> None:
        self._count(retries=1)

    def _count(self, **increments: int) -> None:
        current = self._stats
        self._stats = ClientStats(
            **{
                name: getattr(current, name) + increments.get(name, 0)
                for name in ClientStats.__dataclass_fields__
            }
        )
