"""A teacher service too busy to take a call: every gRPC slot of a real server process is held by calls that
sent their headers and no body, so that gRPC itself refuses every RPC (RESOURCE_EXHAUSTED without retry
pushback), ListTeachers included. The client calls that busy, not broken: it backs off, and a trainer started
during the hold waits it out within `outage_wait_seconds`, from its first call, then finishes.

The slots held are those of a server process whose gRPC `maximum_concurrent_rpcs` is 2, forwarding the
TeacherService's bytes to the teacher server beside it: it refuses the way any gRPC server at its limit does,
whatever the teacher server admits for itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
import yaml

from services._generated import TEACHER_SERVICE_FULL_NAME, teacher_pb2, teacher_pb2_grpc
from services.rpc.backends import LocalBackend
from services.rpc.client import TeacherClient, TeacherServiceError, TeacherServiceUnavailable
from services.rpc.limits import ServiceLimits
from services.rpc.security import ServerSecurity
from services.rpc.server import BackgroundServer
from services.teachers.engine import TeacherEngine
from services.teachers.spec import Preprocessing
from services.teachers.zoo import create_teacher

pytestmark = [pytest.mark.integration, pytest.mark.faults]

EKD = str(Path(sys.executable).parent / "ekd")
SLOTS = 2
DEADLINE_SECONDS = 600.0  # generous: on a loaded machine a trainer takes minutes to start
TEACHER = "cifar_resnet20"

# The teacher server (random weights: nothing to train) and, in front of it, a server of SLOTS gRPC slots
# forwarding the TeacherService's messages as bytes. Prints the front's port once both listen.
_SERVER_PROCESS = textwrap.dedent(
    f"""
    import asyncio
    import grpc, torch
    from services._generated import TEACHER_SERVICE_FULL_NAME
    from services.rpc.backends import LocalBackend
    from services.rpc.security import ServerSecurity
    from services.rpc.server import create_server
    from services.teachers.engine import TeacherEngine
    from services.teachers.spec import Preprocessing
    from services.teachers.zoo import create_teacher

    async def main():
        torch.manual_seed(0)
        torch.set_num_threads(1)
        engine = TeacherEngine(create_teacher({TEACHER!r}, 10, preprocessing=Preprocessing.cifar(8)))
        teacher = create_server(LocalBackend({{{TEACHER!r}: engine}}), security=ServerSecurity())
        await teacher.start()
        upstream = grpc.aio.insecure_channel(f"127.0.0.1:{{teacher.port}}")
        list_teachers = upstream.unary_unary(f"/{{TEACHER_SERVICE_FULL_NAME}}/ListTeachers")
        infer = upstream.unary_stream(f"/{{TEACHER_SERVICE_FULL_NAME}}/Infer")

        async def forward_list_teachers(request, context):
            return await list_teachers(request)

        async def forward_infer(request, context):
            async for response in infer(request):
                yield response

        front = grpc.aio.server(maximum_concurrent_rpcs={SLOTS})
        front.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(TEACHER_SERVICE_FULL_NAME, {{
            "ListTeachers": grpc.unary_unary_rpc_method_handler(forward_list_teachers),
            "Infer": grpc.unary_stream_rpc_method_handler(forward_infer),
        }}),))
        port = front.add_insecure_port("127.0.0.1:0")
        await front.start()
        print(port, flush=True)
        await front.wait_for_termination()

    asyncio.run(main())
    """
)


class Hold:
    """Calls to Infer that send their headers and never a body, each on a connection of its own, until
    `release()` cancels them."""

    def __init__(self, address: str) -> None:
        self._address = address
        self._released = threading.Event()
        self._channels: list[grpc.Channel] = []
        self._calls: list = []

    def take(self) -> None:
        """Hold SLOTS slots: a call the server refused (its slot was taken by a probe) is made again."""
        ended = [call for call in self._calls if call.done()]
        for _ in range(SLOTS - len(self._calls) + len(ended)):
            channel = grpc.insecure_channel(self._address, options=[("grpc.use_local_subchannel_pool", 1)])
            self._channels.append(channel)
            # wait_for_ready: on a loaded machine a connection may take a while; the call waits for it.
            self._calls.append(
                channel.stream_stream(f"/{TEACHER_SERVICE_FULL_NAME}/Infer")(
                    self._no_body(), timeout=DEADLINE_SECONDS, wait_for_ready=True
                )
            )
        self._calls = [call for call in self._calls if call not in ended]

    def _no_body(self) -> Iterator[bytes]:
        self._released.wait(DEADLINE_SECONDS)
        yield from ()

    def release(self) -> None:
        self._released.set()
        for call in self._calls:
            call.cancel()
        for channel in self._channels:
            channel.close()


@pytest.fixture
def busy_service() -> Iterator[str]:
    """The front's address, its slots free."""
    process = subprocess.Popen(
        [sys.executable, "-c", _SERVER_PROCESS], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        yield f"127.0.0.1:{int(process.stdout.readline())}"
    finally:
        process.kill()
        process.wait()


def list_teachers_code(address: str) -> grpc.StatusCode:
    with grpc.insecure_channel(address) as channel:
        try:
            teacher_pb2_grpc.TeacherServiceStub(channel).ListTeachers(
                teacher_pb2.ListTeachersRequest(), timeout=10
            )
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def held(address: str) -> Hold:
    """Every slot of the service at `address` held, once ListTeachers is refused there."""
    hold = Hold(address)
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        hold.take()
        time.sleep(0.5)
        if list_teachers_code(address) == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return hold
        assert time.monotonic() < deadline, "the hold never filled the slots"


def test_a_client_calls_a_refusal_without_pushback_busy_and_retries_it(busy_service):
    hold = held(busy_service)
    try:
        with TeacherClient(busy_service, timeout_seconds=10, retries=2, backoff_seconds=0.05) as client:
            with pytest.raises(TeacherServiceUnavailable, match="RESOURCE_EXHAUSTED") as refused:
                client.teachers()
            assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert client.stats.retries == 2
    finally:
        hold.release()
    with TeacherClient(busy_service, timeout_seconds=10, retries=8, backoff_seconds=0.05) as client:
        # Released: the slots come back as the cancellations land.
        assert TEACHER in client.teachers()
        fetched = client.fetch(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), [TEACHER], ["logits"])
    assert fetched[TEACHER]["logits"].shape == (2, 10)


def test_a_request_too_large_for_the_server_is_not_retried():
    torch.manual_seed(0)
    engine = TeacherEngine(create_teacher(TEACHER, 10, preprocessing=Preprocessing.cifar(16)))
    limits = ServiceLimits(max_message_bytes=12 * 1024)  # one sample's float32 layer1 takes 16 KiB
    with (
        BackgroundServer(LocalBackend({TEACHER: engine}), security=ServerSecurity(), limits=limits) as server,
        TeacherClient(server.address, output_dtype="float32", timeout_seconds=30, retries=3) as client,
    ):
        with pytest.raises(TeacherServiceError, match="max_message_bytes") as refused:
            client.fetch(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), [TEACHER], ["layer1"])
        assert not isinstance(refused.value, TeacherServiceUnavailable)
        assert client.stats.retries == 0


def experiment(tmp_path: Path) -> Path:
    config = tmp_path / "busy.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "busy",
                "seed": 0,
                "data": {"dataset": "digits", "image_size": 8, "views": 1, "batch_size": 256},
                # Served: no checkpoint needed here (the service's teacher is known by its name).
                "teachers": [{"name": TEACHER, "checkpoint": str(tmp_path / "absent.pt")}],
                "method": {"name": "kd", "student": {"arch": "cifar_resnet8"}},
                "train": {"epochs": 1, "lr": 0.05},
                "output_dir": str(tmp_path / "runs"),
            }
        )
    )
    return config


@pytest.mark.slow
def test_a_trainer_started_while_every_slot_is_held_waits_then_finishes(busy_service, tmp_path):
    hold = held(busy_service)
    stderr_path = tmp_path / "stderr.txt"
    with stderr_path.open("w") as stderr:
        trainer = subprocess.Popen(
            [
                EKD,
                "distill",
                str(experiment(tmp_path)),
                "--teacher-service",
                busy_service,
                "--set",
                "teacher_source.outage_wait_seconds=300",
                "--set",
                "teacher_source.outage_backoff_max_seconds=1",
                "--no-tracking",
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        try:
            deadline = time.monotonic() + DEADLINE_SECONDS
            while "waiting up to 300 s" not in " ".join(stderr_path.read_text().split()):
                assert trainer.poll() is None, stderr_path.read_text()
                assert time.monotonic() < deadline, "the trainer never said it waits"
                time.sleep(0.2)
            time.sleep(2.0)  # a few more refused attempts
        finally:
            hold.release()
        stdout, _ = trainer.communicate(timeout=DEADLINE_SECONDS)
    said = stderr_path.read_text()
    assert trainer.returncode == 0, said
    assert "Traceback" not in said
    words = " ".join(said.split())  # log lines come wrapped to the terminal's width
    assert "unreachable (RESOURCE_EXHAUSTED); waiting up to 300 s" in words
    assert "is back after" in words
    record = json.loads((tmp_path / "runs" / "busy" / "results.json").read_text())[0]
    counters = record["counters"]
    assert counters["service_outages"] >= 1 and 0 < counters["outage_wait_seconds"] < 300
    assert counters["teacher_calls"] > 0
    assert "busy" in stdout
