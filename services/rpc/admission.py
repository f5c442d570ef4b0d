"""How the teacher server takes in a request message before any handler sees it.

grpc.aio reads the request of a unary-request RPC (Infer, ListTeachers, health's Check) before calling its
handler, for as long as the caller takes, and a caller that sends its headers and then nothing holds that call
open indefinitely. `RequestReadInterceptor` reads the request itself instead, within `read_seconds` of the
call's start (DEADLINE_EXCEEDED beyond), and decodes it with the method's own deserializer: a request that is
not a valid message ends INVALID_ARGUMENT with the reason, logged as one line, not gRPC's UNKNOWN with a
traceback. The handler then runs as registered.

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

from services.rpc.metrics import Metrics

logger = logging.getLogger(__name__)


class RequestReadInterceptor(grpc.aio.ServerInterceptor):
    """Reads each unary request within `read_seconds` and decodes it (module doc); streaming-request methods
    pass through unchanged."""

    def __init__(self, read_seconds: float, metrics: Metrics) -> None:
        self._read_seconds = read_seconds
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        method = handler_call_details.method
        if handler.response_streaming:
            behavior = handler.unary_stream
            if inspect.isasyncgenfunction(behavior):

                async def stream_responses(
                    _requests, context: grpc.aio.ServicerContext
                ) -> AsyncIterator[Any]:
                    request = await self._read(method, handler.request_deserializer, context)
                    async for response in behavior(request, context):
                        yield response

                return grpc.stream_stream_rpc_method_handler(
                    stream_responses, response_serializer=handler.response_serializer
                )

            async def write_responses(_requests, context: grpc.aio.ServicerContext) -> None:
                await behavior(await self._read(method, handler.request_deserializer, context), context)

            return grpc.stream_stream_rpc_method_handler(
                write_responses, response_serializer=handler.response_serializer
            )

        async def respond(_requests, context: grpc.aio.ServicerContext) -> Any:
            return await handler.unary_unary(
                await self._read(method, handler.request_deserializer, context), context
            )

        return grpc.stream_unary_rpc_method_handler(respond, response_serializer=handler.response_serializer)

    async def _read(
        self,
        method: str,
        deserializer: Callable[[bytes], Any] | None,
        context: grpc.aio.ServicerContext,
    ) -> Any:
        """The call's request, decoded; or the call ends (abort) when it does not come in time, does not come
        at all, or does not decode."""
        try:
            raw = await asyncio.wait_for(context.read(), self._read_seconds)
        except TimeoutError:
            self._metrics.unread_requests.labels(method, "timeout").inc()
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no request message within {self._read_seconds:g} s of the call's start",
            )
        if raw is grpc.aio.EOF:
            self._metrics.unread_requests.labels(method, "missing").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call ended without a request message")
        if deserializer is None:
            return raw
        try:
            return deserializer(raw)
        except DecodeError as error:
            self._metrics.unread_requests.labels(method, "undecodable").inc()
            logger.warning("refused a %s request of %d bytes: %s", method, len(raw), error)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot read the request: {error}")
