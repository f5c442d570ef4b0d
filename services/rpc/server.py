"""The teacher gRPC server: `create_server` builds a grpc.aio server with the TeacherService, the standard
grpc.health.v1 health service and server reflection, like grpc's examples/python/errors/server.py factory.

    async def main():
        running = create_server(LocalBackend(engines), store=open_store("/var/cache/ekd"),
                                address="0.0.0.0:50051")
        await running.start()
        await running.wait_for_termination()

Call `create_server` from a coroutine running on the event loop that will serve: grpc.aio binds a server to
the loop current when it is created.

Transport security (`services.rpc.security`) comes from the environment unless given: TLS when
EKD_TLS_CERT_FILE and EKD_TLS_KEY_FILE are set (client certificates required when EKD_TLS_CLIENT_CA_FILE is),
a bearer token on every RPC but health and reflection when EKD_AUTH_TOKEN or EKD_AUTH_TOKEN_FILE is. Unset,
the server listens without either, and says so in a warning when its address is reachable from other machines.

Hostile callers meet bounds (`ServiceLimits`): a request larger than `max_message_bytes` is refused by gRPC;
every call must send its request within `request_read_seconds` and a decodable one
(`services.rpc.admission`); one connection holds at most `max_streams_per_connection` calls; at most
`max_concurrent_rpcs` Infer RPCs and `max_inflight_request_bytes` of their requests are processed at once
(RESOURCE_EXHAUSTED beyond, from the servicer, which counts an Infer only once its request is in). gRPC's own
cap on concurrent RPCs of every kind is not set: calls that send headers and nothing else would fill it and
shut out health checks and ListTeachers, which cost nothing to answer.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Collection
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services._generated import TEACHER_SERVICE_FULL_NAME, teacher_pb2
from services.cache import TeacherOutputStore
from services.rpc.admission import RequestReadInterceptor
from services.rpc.backends import TeacherBackend
from services.rpc.limits import DEFAULT_LIMITS, ServiceLimits
from services.rpc.metrics import Metrics
from services.rpc.security import (
    DEFAULT_AUTH_EXEMPT_SERVICES,
    TLS_CERT_FILE,
    TLS_KEY_FILE,
    ServerSecurity,
    is_loopback,
)
from services.rpc.servicer import TeacherServicer
from services.rpc.wire import parse_infer_request

logger = logging.getLogger(__name__)

OVERALL_HEALTH = ""
"""The health-check service name that stands for the whole server."""


@dataclass
class RunningServer:
    """A created teacher server: serve with `await start()`, end with `await stop(grace)`."""

    server: grpc.aio.Server
    port: int
    metrics: Metrics
    servicer: TeacherServicer
    health: health.aio.HealthServicer

    async def start(self) -> None:
        await self.server.start()
        for service in (OVERALL_HEALTH, TEACHER_SERVICE_FULL_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, then stop, giving running RPCs `grace` seconds (None: cancel them now); then
        wait for the cache writes of the requests answered (bounded: `wait_for_cache_writes`)."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await asyncio.to_thread(self.servicer.wait_for_cache_writes)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


def create_server(
    backend: TeacherBackend,
    *,
    store: TeacherOutputStore | None = None,
    address: str = "127.0.0.1:0",
    limits: ServiceLimits = DEFAULT_LIMITS,
    metrics: Metrics | None = None,
    security: ServerSecurity | None = None,
    auth_exempt_services: Collection[str] = DEFAULT_AUTH_EXEMPT_SERVICES,
) -> RunningServer:
    """A server for `backend`'s teachers on `address` (port 0: a free one, see `.port`), not yet started.

    `limits.max_message_bytes` bounds the messages the server receives and sends; the servicer announces it
    in ListTeachers and keeps its response chunks under it. `security` None reads it from the environment
    (`ServerSecurity.from_environment`); `ServerSecurity()` is explicitly insecure. `auth_exempt_services`
    are the services callable without the token (full names; health and reflection by default).
    """
    security = security if security is not None else ServerSecurity.from_environment()
    metrics = metrics if metrics is not None else Metrics()
    servicer = TeacherServicer(backend, store, metrics, limits=limits)
    server = grpc.aio.server(
        # The token is checked first, so that a caller without it never gets as far as sending a request.
        interceptors=[
            *security.interceptors(auth_exempt_services),
            RequestReadInterceptor(limits.request_read_seconds, metrics),
        ],
        options=[
            ("grpc.max_send_message_length", limits.max_message_bytes),
            ("grpc.max_receive_message_length", limits.max_message_bytes),
            ("grpc.max_concurrent_streams", limits.max_streams_per_connection),
            # Several servers (ingress replicas on one node) may listen on one port; the kernel spreads the
            # connections over them. grpc's default on Linux, stated because scaling out relies on it.
            ("grpc.so_reuseport", 1),
        ],
    )
    server.add_generic_rpc_handlers((_teacher_service_handler(servicer),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [TEACHER_SERVICE_FULL_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    credentials = security.credentials()
    if credentials is not None:
        port = server.add_secure_port(address, credentials)
    else:
        if not is_loopback(address):
            logger.warning(
                "the teacher service listens on %s without TLS: its traffic can be read and altered on the "
                "network (set %s and %s)",
                address,
                TLS_CERT_FILE,
                TLS_KEY_FILE,
            )
        port = server.add_insecure_port(address)
    return RunningServer(server=server, port=port, metrics=metrics, servicer=servicer, health=health_servicer)


def _teacher_service_handler(servicer: TeacherServicer) -> grpc.GenericRpcHandler:
    """The TeacherService's methods, Infer reading its request with `parse_infer_request` (no copies of the
    image bytes) instead of protobuf's."""
    return grpc.method_handlers_generic_handler(
        TEACHER_SERVICE_FULL_NAME,
        {
            "ListTeachers": grpc.unary_unary_rpc_method_handler(
                servicer.ListTeachers,
                request_deserializer=teacher_pb2.ListTeachersRequest.FromString,
                response_serializer=teacher_pb2.ListTeachersResponse.SerializeToString,
            ),
            "Infer": grpc.unary_stream_rpc_method_handler(
                servicer.Infer,
                request_deserializer=parse_infer_request,
                response_serializer=teacher_pb2.InferResponse.SerializeToString,
            ),
        },
    )


class BackgroundServer:
    """A started server on an event loop of its own in a daemon thread, for synchronous callers (tests,
    benchmarks, in-process stacks): `with BackgroundServer(backend, store=...) as server: server.address`."""

    def __init__(self, backend: TeacherBackend, *, timeout_seconds: float = 30.0, **options) -> None:
        self._timeout = timeout_seconds
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ekd-teacher-server", daemon=True)
        self._thread.start()
        self.running: RunningServer = self._run(self._start(backend, options))
        self.address = f"127.0.0.1:{self.running.port}"

    @staticmethod
    async def _start(backend: TeacherBackend, options) -> RunningServer:
        running = create_server(backend, **options)  # inside the loop that serves it, as grpc.aio requires
        await running.start()
        return running

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=self._timeout)

    async def _stop(self) -> None:
        await self.running.stop(None)
        # A stream cut by the stop may still wait in its generator: ended here, inside the loop, it cannot
        # outlive the closed loop and fail at garbage collection instead.
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        if others:
            await asyncio.wait(others, timeout=self._timeout / 2)
        await asyncio.get_running_loop().shutdown_asyncgens()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=self._timeout)
        self._loop.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
