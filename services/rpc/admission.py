"""How the teacher server takes in a request message before any handler sees it.

grpc.aio reads the request of a unary-request RPC (Infer, ListTeachers, health's Check) before calling its
handler, for as long as the caller takes, and a caller that sends its headers and then nothing holds that call
open indefinitely. `RequestReadInterceptor` reads the request itself instead, within `read_seconds` of the
call's start (DEADLINE_EXCEEDED beyond), and decodes it with the method's own deserializer: a request that is
not a valid message ends INVALID_ARGUMENT with the reason, logged as one line, not gRPC's UNKNOWN with a
traceback. The handler then runs as registered, and when it ends, `services.rpc.heap` is told how large a
request the server has let go of.

Nothing here counts calls: a call waiting for its request holds no slot that others need (the servicer admits
an Infer only once its request is in, `services.rpc.servicer`), so health checks and ListTeachers are answered
whatever number of calls wait, and each waiting call ends at its read deadline.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from services.rpc.heap import HeapTrimmer
from services.rpc.metrics import Metrics

logger = logging.getLogger(__name__)


class RequestReadInterceptor(grpc.aio.ServerInterceptor):
    """Reads each unary request within `read_seconds` and decodes it (module doc); streaming-request methods
    pass through unchanged."""

    def __init__(self, read_seconds: float, metrics: Metrics) -> None:
        self._read_seconds = read_seconds
        self._metrics = metrics
        self._heap = HeapTrimmer()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        method = handler_call_details.method
        deserializer = handler.request_deserializer
        if handler.response_streaming:
            behavior = handler.unary_stream
            if inspect.isasyncgenfunction(behavior):

                async def stream_responses(
                    _requests, context: grpc.aio.ServicerContext
                ) -> AsyncIterator[Any]:
                    request, size = await self._read(method, deserializer, context)
                    try:
                        if request is not _UNREAD:
                            async for response in behavior(request, context):
                                yield response
                    finally:
                        self._heap.released(size)

                return grpc.stream_stream_rpc_method_handler(
                    stream_responses, response_serializer=handler.response_serializer
                )

            async def write_responses(_requests, context: grpc.aio.ServicerContext) -> None:
                request, size = await self._read(method, deserializer, context)
                try:
                    if request is not _UNREAD:
                        await behavior(request, context)
                finally:
                    self._heap.released(size)

            return grpc.stream_stream_rpc_method_handler(
                write_responses, response_serializer=handler.response_serializer
            )

        async def respond(_requests, context: grpc.aio.ServicerContext) -> Any:
            request, size = await self._read(method, deserializer, context)
            try:
                return None if request is _UNREAD else await handler.unary_unary(request, context)
            finally:
                self._heap.released(size)

        return grpc.stream_unary_rpc_method_handler(respond, response_serializer=handler.response_serializer)

    async def _read(
        self,
        method: str,
        deserializer: Callable[[bytes], Any] | None,
        context: grpc.aio.ServicerContext,
    ) -> tuple[Any, int]:
        """(the call's request, decoded; its size in bytes), or (_UNREAD, its size) with the call's status set
        when it does not come in time, does not come at all, or does not decode. The status is set, not raised
        by `context.abort`: grpc keeps that exception, and with it the frames that hold the request, in a
        reference cycle that only a full garbage collection breaks."""
        try:
            raw = await asyncio.wait_for(context.read(), self._read_seconds)
        except TimeoutError:
            self._refuse(
                context,
                method,
                "timeout",
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no request message within {self._read_seconds:g} s of the call's start",
            )
            return _UNREAD, 0
        if raw is grpc.aio.EOF:
            self._refuse(
                context,
                method,
                "missing",
                grpc.StatusCode.INVALID_ARGUMENT,
                "the call ended without a request message",
            )
            return _UNREAD, 0
        if deserializer is None:
            return raw, len(raw)
        try:
            return deserializer(raw), len(raw)
        except DecodeError as error:
            logger.warning("refused a %s request of %d bytes: %s", method, len(raw), error)
            self._refuse(
                context,
                method,
                "undecodable",
                grpc.StatusCode.INVALID_ARGUMENT,
                f"cannot read the request: {error}",
            )
            return _UNREAD, len(raw)

    def _refuse(
        self, context: grpc.aio.ServicerContext, method: str, reason: str, code: grpc.StatusCode, details: str
    ) -> None:
        self._metrics.unread_requests.labels(method, reason).inc()
        context.set_code(code)
        context.set_details(details)


_UNREAD = object()
"""What `_read` returns for a call it has ended."""
