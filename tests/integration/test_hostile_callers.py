"""The teacher server against hostile or careless callers, over real gRPC on 127.0.0.1: requests naming
huge numbers of teachers, error messages that would echo them, more concurrent RPCs or request bytes than the
server takes, and the server memory a large valid request costs (measured on a server in its own process).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services._generated import teacher_pb2, teacher_pb2_grpc
from services.core.contract import (
    ADMISSION_RETRY_MILLISECONDS,
    MAX_NAME_LENGTH,
    MAX_TEACHERS_PER_REQUEST,
    RETRY_PUSHBACK_METADATA,
)
from services.rpc.backends import FORWARD_SLICE_BYTES, LocalBackend
from services.rpc.client import TeacherClient
from services.rpc.limits import ServiceLimits
from services.rpc.security import ServerSecurity
from services.rpc.server import BackgroundServer
from services.rpc.servicer import MAX_ERROR_MESSAGE_CHARS
from services.rpc.wire import MAX_MESSAGE_FIELDS
from services.teachers.engine import TeacherEngine
from services.teachers.spec import Preprocessing
from services.teachers.zoo import create_teacher

pytestmark = [pytest.mark.integration, pytest.mark.faults]

DEADLINE_SECONDS = 20.0
HEALTH_SECONDS = 1.0


@pytest.fixture(scope="module")
def engine() -> TeacherEngine:
    torch.manual_seed(0)
    return TeacherEngine(create_teacher("cifar_resnet20", 10, preprocessing=Preprocessing.cifar(16)))


class GatedBackend(LocalBackend):
    """Forward passes wait until `gate` is set; `waiting` counts those waiting."""

    def __init__(self, engines) -> None:
        super().__init__(engines)
        self.gate = threading.Event()
        self.waiting = 0

    async def infer(self, name, images, outputs):
        self.waiting += 1
        try:
            await asyncio.to_thread(self.gate.wait, DEADLINE_SECONDS)
        finally:
            self.waiting -= 1
        return await super().infer(name, images, outputs)


class Server(BackgroundServer):
    def __init__(self, backend, **options) -> None:
        super().__init__(backend, timeout_seconds=DEADLINE_SECONDS, security=ServerSecurity(), **options)
        self.channel = grpc.insecure_channel(self.address)
        self.stub = teacher_pb2_grpc.TeacherServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def health_seconds(self) -> float:
        """Seconds a health check takes to answer SERVING, on a channel of its own."""
        with grpc.insecure_channel(self.address) as channel:
            started = time.perf_counter()
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=DEADLINE_SECONDS
            )
            elapsed = time.perf_counter() - started
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        return elapsed

    def close(self) -> None:
        self.channel.close()
        super().close()


@pytest.fixture
def serve(engine) -> Iterator:
    servers = []

    def start(backend=None, **options) -> Server:
        servers.append(Server(backend if backend is not None else LocalBackend({"t": engine}), **options))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def request(teachers: list[str], batch: int = 2, size: int = 16) -> teacher_pb2.InferRequest:
    pixels = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    return teacher_pb2.InferRequest(
        teachers=teachers,
        images=teacher_pb2.Tensor(
            dtype=teacher_pb2.UINT8, shape=list(pixels.shape), data=pixels.numpy().tobytes()
        ),
    )


def call(server: Server, message: teacher_pb2.InferRequest) -> grpc.StatusCode:
    """The status an Infer ends with (OK when it streams everything)."""
    try:
        list(server.stub.Infer(message, timeout=DEADLINE_SECONDS))
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def rejection(server: Server, message: teacher_pb2.InferRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as failure:
        list(server.stub.Infer(message, timeout=DEADLINE_SECONDS))
    return failure.value


def wait_until(condition, seconds: float = DEADLINE_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


# ---- validation ------------------------------------------------------------------------------------------


def test_request_naming_40k_distinct_teachers_is_rejected_at_once_and_health_stays_fast(serve):
    server = serve()
    hostile = request([f"t{index:05d}" for index in range(40_000)])
    assert hostile.ByteSize() > 300_000
    with ThreadPoolExecutor(4) as pool:
        started = time.perf_counter()
        rejections = [pool.submit(rejection, server, hostile) for _ in range(3)]
        health = server.health_seconds()
        errors = [future.result() for future in rejections]
        elapsed = time.perf_counter() - started
    assert health < HEALTH_SECONDS
    assert elapsed < 2.0, f"three hostile requests took {elapsed:.2f} s"
    for error in errors:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details() == (
            f"cannot read the request: InferRequest of {hostile.ByteSize()} bytes carries more than "
            f"{MAX_MESSAGE_FIELDS} fields, {MAX_MESSAGE_FIELDS} of the first {MAX_MESSAGE_FIELDS} 'teachers'"
        )
    assert call(server, request(["t"])) == grpc.StatusCode.OK


def test_error_echoing_unknown_names_stays_short(serve):
    server = serve()
    error = rejection(
        server, request([f"unknown-{index}".ljust(MAX_NAME_LENGTH, "x") for index in range(64)])
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details().startswith("unknown teachers ['unknown-0")
    assert "and 56 more; hosted teachers: t" in error.details()
    assert len(error.details()) <= MAX_ERROR_MESSAGE_CHARS

    many = rejection(server, request([f"u{index}" for index in range(10_000)]))
    assert many.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(many.details()) < 160 and "u1" not in many.details()

    too_long = rejection(server, request(["x" * (MAX_NAME_LENGTH + 1)]))
    assert too_long.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"longer than {MAX_NAME_LENGTH} characters" in too_long.details()
    assert len(too_long.details()) <= MAX_ERROR_MESSAGE_CHARS


def test_duplicates_among_many_names_are_found_in_linear_time(serve):
    server = serve()
    names = ["t", *(f"u{index}" for index in range(MAX_TEACHERS_PER_REQUEST - 2)), "t"]
    error = rejection(server, request(names))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "duplicate teachers ['t']; name each at most once"


def test_long_request_id_is_rejected(serve):
    server = serve()
    message = request(["t"])
    message.request_id = "r" * 100_000
    error = rejection(server, message)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("request_id of 100000 characters")


# ---- concurrency and byte caps ---------------------------------------------------------------------------


def test_rpcs_beyond_max_concurrent_rpcs_are_refused_and_health_still_answers(serve, engine):
    backend = GatedBackend({"t": engine})
    server = serve(backend, limits=ServiceLimits(max_concurrent_rpcs=2))
    with ThreadPoolExecutor(12) as pool:
        admitted = [pool.submit(call, server, request(["t"])) for _ in range(2)]
        wait_until(lambda: backend.waiting == 2)
        refused = [pool.submit(call, server, request(["t"])) for _ in range(8)]
        codes = [future.result() for future in refused]
        assert server.health_seconds() < HEALTH_SECONDS
        backend.gate.set()
        assert [future.result() for future in admitted] == [grpc.StatusCode.OK] * 2
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 8
    assert call(server, request(["t"])) == grpc.StatusCode.OK


def test_a_client_retries_a_busy_server_and_a_cancelled_request_holds_its_slot_until_its_forward_ends(
    serve, engine
):
    """A refusal by the caps carries gRPC's retry pushback, so TeacherClient tries again (and a trainer waits
    it out like an outage); a caller that cancels keeps its slot while its forward pass runs on."""
    backend = GatedBackend({"t": engine})
    server = serve(backend, limits=ServiceLimits(max_concurrent_rpcs=1))
    with grpc.insecure_channel(server.address) as channel:
        held = teacher_pb2_grpc.TeacherServiceStub(channel).Infer(request(["t"]), timeout=DEADLINE_SECONDS)
        wait_until(lambda: backend.waiting == 1)
        held.cancel()  # the forward pass goes on behind the gate: the request must stay admitted
        refusal = rejection(server, request(["t"]))
        assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (RETRY_PUSHBACK_METADATA, str(ADMISSION_RETRY_MILLISECONDS)) in refusal.trailing_metadata()

        payload = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
        with TeacherClient(server.address, timeout_seconds=DEADLINE_SECONDS, retries=6) as client:
            threading.Timer(0.3, backend.gate.set).start()  # the held forward ends; its slot is freed
            fetched = client.fetch(payload, ["t"], ["logits"])
            assert client.stats.retries >= 1
    assert fetched["t"]["logits"].shape == (2, 10)


def test_request_bytes_beyond_max_inflight_request_bytes_are_refused(serve, engine):
    backend = GatedBackend({"t": engine})
    limit = 1 << 20
    server = serve(backend, limits=ServiceLimits(max_message_bytes=limit, max_inflight_request_bytes=limit))
    big = request(["t"], batch=50, size=64)  # 600 KB: one fits, two do not
    assert limit // 2 < big.ByteSize() < limit
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(call, server, big)
        wait_until(lambda: backend.waiting == 1)
        error = rejection(server, big)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"would exceed max_inflight_request_bytes={limit}" in error.details()
        small = pool.submit(call, server, request(["t"]))
        wait_until(lambda: backend.waiting == 2)  # admitted beside the first: its bytes fit
        backend.gate.set()
        assert first.result() == small.result() == grpc.StatusCode.OK
    assert call(server, big) == grpc.StatusCode.OK


# ---- memory ----------------------------------------------------------------------------------------------

_SERVER_PROCESS = textwrap.dedent(
    """
    import asyncio, sys, torch
    from services.rpc.backends import LocalBackend
    from services.teachers.engine import TeacherEngine
    from services.rpc.security import ServerSecurity
    from services.rpc.server import create_server
    from services.teachers.zoo import Preprocessing, create_teacher

    def peak_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    async def main():
        torch.set_num_threads(1)
        engine = TeacherEngine(create_teacher("cifar_resnet20", 10, preprocessing=Preprocessing.cifar(32)))
        running = create_server(LocalBackend({"t": engine}), security=ServerSecurity())
        await running.start()
        print(running.port, flush=True)
        # One line in per question, the peak resident memory so far out; read off the loop, which serves.
        while await asyncio.to_thread(sys.stdin.readline):
            print(peak_bytes(), flush=True)

    asyncio.run(main())
    """
)


def test_large_request_costs_a_small_multiple_of_its_size_in_server_memory():
    """The 224x224 images of a 30 MB request are resized to the teacher's 32x32: were they converted to float
    all at once, the server would hold 4 bytes per pixel of the whole request (measured before slicing:
    6.4 x the request's size)."""
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVER_PROCESS], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        port = int(server.stdout.readline())

        def peak() -> int:
            server.stdin.write("\n")
            server.stdin.flush()
            return int(server.stdout.readline())

        options = [("grpc.max_send_message_length", 1 << 26)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            stub = teacher_pb2_grpc.TeacherServiceStub(channel)
            list(stub.Infer(request(["t"], batch=2, size=224), timeout=DEADLINE_SECONDS))  # warm up
            before = peak()
            large = request(["t"], batch=200, size=224)
            responses = list(stub.Infer(large, timeout=60))
            after = peak()
    finally:
        server.kill()
        server.wait()
    assert sum(response.count for response in responses) == 200
    grown = after - before
    # gRPC holds a received message up to three times while handing it over; the forward's working set is a
    # slice's float copy and activations, and the allocator's slack around them (8 slices' worth: before the
    # slicing, this request took 6.4 x its size, far beyond).
    bound = 3.5 * large.ByteSize() + 8 * FORWARD_SLICE_BYTES
    assert grown <= bound, f"{grown / 2**20:.0f} MiB for a {large.ByteSize() / 2**20:.0f} MiB request"
