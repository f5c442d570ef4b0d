"""`python -m services.rpc.healthcheck` against a real gRPC server carrying the standard health servicer."""

import socket
import subprocess
import sys
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.rpc.healthcheck import main, probe

pytestmark = pytest.mark.integration

TEACHER_SERVICE = "ekd.v1.TeacherService"


@pytest.fixture
def health_server():
    """(address, health servicer) of a started server on 127.0.0.1; everything starts SERVING."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    for service in ("", TEACHER_SERVICE):
        servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    yield f"127.0.0.1:{port}", servicer
    server.stop(grace=None)


@pytest.fixture
def dead_address():
    """127.0.0.1:PORT where nothing listens: the port was bound, then released."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


def test_serving_server_exits_0_with_one_line(health_server, capsys):
    address, _ = health_server
    assert main([address]) == 0
    out = capsys.readouterr().out
    assert out == f"healthy: the server at {address} is SERVING\n"


def test_named_service_is_asked_about(health_server, capsys):
    address, servicer = health_server
    servicer.set(TEACHER_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert main([address]) == 0
    assert main([address, "--service", TEACHER_SERVICE]) == 1
    err = capsys.readouterr().err
    assert err == f"unhealthy: '{TEACHER_SERVICE}' at {address} is NOT_SERVING\n"


def test_not_serving_exits_1(health_server, capsys):
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert main([address]) == 1
    assert capsys.readouterr().err == f"unhealthy: the server at {address} is NOT_SERVING\n"


def test_unknown_service_exits_1(health_server, capsys):
    address, _ = health_server
    assert main([address, "--service", "no.such.Service"]) == 1
    assert capsys.readouterr().err == f"unhealthy: {address} does not know the service 'no.such.Service'\n"


def test_dead_port_exits_1_saying_unreachable(dead_address, capsys):
    # A refused connection fails the call at once; the timeout only bounds a host that never answers.
    assert main([dead_address, "--timeout", "20"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"unhealthy: {dead_address} unreachable (UNAVAILABLE: ")
    assert err.count("\n") == 1


def test_silent_server_is_cut_at_the_timeout():
    # A listening socket that never speaks HTTP/2: the connection opens, the answer never comes.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        serving, message = probe(address, timeout=0.5)
    assert (serving, message) == (False, f"unhealthy: {address} gave no health answer within 0.5 s")


@pytest.mark.parametrize("bad", ["0", "-1", "soon"])
def test_timeout_must_be_positive_seconds(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["127.0.0.1:1", "--timeout", bad])
    assert exit_info.value.code == 2
    assert "seconds" in capsys.readouterr().err
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
        probe("127.0.0.1:1", timeout=0)


def test_module_entry_point_is_what_healthchecks_run(health_server, dead_address):
    address, _ = health_server
    serving = subprocess.run(
        [sys.executable, "-m", "services.rpc.healthcheck", address, "--timeout", "20"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (serving.returncode, serving.stdout) == (0, f"healthy: the server at {address} is SERVING\n")
    dead = subprocess.run(
        [sys.executable, "-m", "services.rpc.healthcheck", dead_address, "--timeout", "20"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dead.returncode == 1
    assert dead.stderr.startswith(f"unhealthy: {dead_address} unreachable")
