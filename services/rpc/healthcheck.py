"""Ask a gRPC server's standard health service (grpc.health.v1) whether it is serving.

    python -m services.rpc.healthcheck HOST:PORT [--service NAME] [--timeout SECONDS]

Exits 0 when the server answers SERVING, 1 otherwise (NOT_SERVING, an unknown service, unreachable, too
slow), and prints one line saying which. It is the probe of the images' HEALTHCHECK and of docker-compose,
which cannot speak gRPC themselves (Kubernetes probes gRPC natively). An empty service name, the default, asks
about the whole server; `ekd.v1.TeacherService` asks about the teacher service alone.

It connects as any client does (`services.rpc.security.ClientSecurity.from_environment`): over TLS when
EKD_TLS_CA_FILE is set (and EKD_TLS_SERVER_NAME when the certificate does not name the address's host), with
the bearer token when EKD_AUTH_TOKEN or EKD_AUTH_TOKEN_FILE is set (health is exempt from it by default).
There are no command-line options for either: a secret there would be visible in the process list.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core.errors import ConfigError
from services.rpc.security import ClientSecurity

DEFAULT_TIMEOUT_S = 5.0


def probe(
    address: str,
    service: str = "",
    timeout: float = DEFAULT_TIMEOUT_S,
    security: ClientSecurity | None = None,
) -> tuple[bool, str]:
    """(serving, one-line message) for `service` on the server at `address`, waiting at most `timeout`
    seconds, connecting with `security` (None: from the environment). The call does not wait for a
    connection: a refused connection fails at once, a silent host at the deadline."""
    if timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    shown = repr(service) if service else "the server"
    security = security if security is not None else ClientSecurity.from_environment()
    with security.channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as error:
            code = error.code()
            if code == grpc.StatusCode.NOT_FOUND:
                return False, f"unhealthy: {address} does not know the service {service!r}"
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return False, f"unhealthy: {address} gave no health answer within {timeout:g} s"
            return False, f"unhealthy: {address} unreachable ({code.name}: {error.details()})"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status == health_pb2.HealthCheckResponse.SERVING:
        return True, f"healthy: {shown} at {address} is SERVING"
    return False, f"unhealthy: {shown} at {address} is {status}"


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.rpc.healthcheck",
        description="Exit 0 when the gRPC server at HOST:PORT reports SERVING on grpc.health.v1, else 1.",
    )
    parser.add_argument("address", metavar="HOST:PORT", help="the server, e.g. 127.0.0.1:50051")
    parser.add_argument("--service", default="", help="service to ask about (default: the whole server)")
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds to wait for the answer (default {DEFAULT_TIMEOUT_S:g})",
    )
    args = parser.parse_args(argv)
    try:
        serving, message = probe(args.address, args.service, args.timeout)
    except ConfigError as error:
        serving, message = False, f"unhealthy: cannot connect as configured: {error}"
    print(message, file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
