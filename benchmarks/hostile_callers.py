"""The teacher server against hostile callers, measured from outside: a server in a process of its own
(`create_server` + `LocalBackend`, cifar_resnet20 at 16 px), raw gRPC channels on 127.0.0.1.

    .venv/bin/python benchmarks/hostile_callers.py [--readme]    # --readme: write the table into README.md

- padded: a valid one-teacher request padded to 4 / 16 / 60 MB with empty teacher names or unknown fields;
  the time to its answer (client send included) and the health-check latency meanwhile;
- held: 200 calls that send headers and no request, over 10 connections, held while health Check and
  ListTeachers are timed: Infer calls on a server without a token, and, on a TLS server with a token,
  health Checks without it (the one method exempt from the token);
- memory: the server's resident memory after one 60 MB request, then after each of three waves of 24
  requests of 60 MB at once (most refused by the in-flight byte cap once received), each read 3 s after
  the wave.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2

from services._generated import teacher_pb2
from services.rpc.security import AUTH_TOKEN, TLS_CERT_FILE, TLS_KEY_FILE

README = Path(__file__).with_name("README.md")
SECTION_START = "<!-- hostile_callers.py: start -->"
SECTION_END = "<!-- hostile_callers.py: end -->"

INFER = "/ekd.v1.TeacherService/Infer"
LIST_TEACHERS = "/ekd.v1.TeacherService/ListTeachers"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
TOKEN = "benchmark-token-of-hostile-callers"
LARGE_MESSAGES = [("grpc.max_send_message_length", 1 << 27), ("grpc.max_receive_message_length", 1 << 27)]
TIMEOUT_SECONDS = 300.0
HELD_CALLS = 200
PROBES = 20
IMAGE_BYTES = 3 * 224 * 224

PADDINGS = {"empty teacher names": b"\x0a\x00", "unknown fields": b"\xa0\x06\x00"}

_SERVER_PROCESS = textwrap.dedent(
    """
    import asyncio, sys, torch
    from services.rpc.backends import LocalBackend
    from services.rpc.server import create_server
    from services.teachers.engine import TeacherEngine
    from services.teachers.zoo import Preprocessing, create_teacher

    def resident_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

    async def main():
        torch.set_num_threads(1)
        torch.manual_seed(0)
        engine = TeacherEngine(create_teacher("cifar_resnet20", 10, preprocessing=Preprocessing.cifar(16)))
        running = create_server(LocalBackend({"t": engine}))  # security from the environment
        await running.start()
        print(running.port, flush=True)
        while await asyncio.to_thread(sys.stdin.readline):
            print(resident_bytes(), flush=True)

    asyncio.run(main())
    """
)


_PROBE_PROCESS = textwrap.dedent(
    """
    import json, sys, threading, time
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    latencies = []
    with grpc.insecure_channel(sys.argv[1]) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        check(health_pb2.HealthCheckRequest(), timeout=60)
        print("ready", flush=True)
        while not stop.is_set() or not latencies:
            started = time.perf_counter()
            check(health_pb2.HealthCheckRequest(), timeout=60)
            latencies.append(time.perf_counter() - started)
            time.sleep(0.01)
    print(json.dumps(latencies), flush=True)
    """
)


class HealthProbes:
    """Health checks, one after another, from a process of their own (so that the caller's own work, such as
    sending a 60 MB request, does not delay them) until `stop()`, which returns their latencies."""

    def __init__(self, address: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _PROBE_PROCESS, address],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "ready"

    def stop(self) -> list[float]:
        output, _ = self.process.communicate("\n", timeout=TIMEOUT_SECONDS)
        return json.loads(output)


class ServerProcess:
    def __init__(self, environment: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _SERVER_PROCESS],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(environment or {})},
            cwd=Path(__file__).resolve().parents[1],
        )
        assert self.process.stdout is not None
        self.address = f"127.0.0.1:{int(self.process.stdout.readline())}"

    def resident_mib(self) -> float:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        return int(self.process.stdout.readline()) / 2**20

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


def infer_request(batch: int, size: int) -> bytes:
    pixels = os.urandom(batch * 3 * size * size)
    return teacher_pb2.InferRequest(
        teachers=["t"],
        images=teacher_pb2.Tensor(dtype=teacher_pb2.UINT8, shape=[batch, 3, size, size], data=pixels),
    ).SerializeToString()


async def infer(channel: grpc.aio.Channel, request: bytes, metadata=()) -> str:
    """The status name an Infer of these bytes ends with."""
    try:
        async for _ in channel.unary_stream(INFER)(request, timeout=TIMEOUT_SECONDS, metadata=metadata):
            pass
    except grpc.aio.AioRpcError as error:
        return error.code().name
    return "OK"


async def seconds(call: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await call()
    return time.perf_counter() - started


def health_check(channel: grpc.aio.Channel) -> Callable[[], Awaitable[object]]:
    check = channel.unary_unary(HEALTH_CHECK, response_deserializer=health_pb2.HealthCheckResponse.FromString)
    return lambda: check(health_pb2.HealthCheckRequest().SerializeToString(), timeout=TIMEOUT_SECONDS)


def list_teachers(channel: grpc.aio.Channel, metadata=()) -> Callable[[], Awaitable[object]]:
    listing = channel.unary_unary(
        LIST_TEACHERS, response_deserializer=teacher_pb2.ListTeachersResponse.FromString
    )
    return lambda: listing(b"", timeout=TIMEOUT_SECONDS, metadata=metadata)


def milliseconds(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:.1f} / {max(values) * 1e3:.1f}"


# ---- padded requests -------------------------------------------------------------------------------------


async def padded_rows(server: ServerProcess) -> list[list[str]]:
    rows = []
    base = infer_request(batch=2, size=16)
    async with grpc.aio.insecure_channel(server.address, options=LARGE_MESSAGES) as channel:
        for kind, padding in PADDINGS.items():
            for megabytes in (4, 16, 60):
                request = base + padding * (megabytes * 10**6 // len(padding))
                probes = HealthProbes(server.address)
                started = time.perf_counter()
                answer = await infer(channel, request)
                elapsed = time.perf_counter() - started
                latencies = probes.stop()
                rows.append(
                    [
                        kind,
                        f"{megabytes}",
                        answer,
                        f"{elapsed:.3f}",
                        milliseconds(latencies),
                        f"{len(latencies)}",
                    ]
                )
    return rows


# ---- held calls ------------------------------------------------------------------------------------------


async def _never_a_request():
    await asyncio.Event().wait()
    yield b""  # never reached


def connections(
    address: str, count: int, credentials: grpc.ChannelCredentials | None
) -> list[grpc.aio.Channel]:
    channels = []
    for index in range(count):
        options = [("ekd.benchmark.connection", index)]
        channels.append(
            grpc.aio.secure_channel(address, credentials, options=options)
            if credentials is not None
            else grpc.aio.insecure_channel(address, options=options)
        )
    return channels


async def held_row(
    label: str, server: ServerProcess, method: str, credentials: grpc.ChannelCredentials | None, metadata=()
) -> list[str]:
    holders = connections(server.address, 10, credentials)
    held = [holders[index % 10].stream_stream(method)(_never_a_request()) for index in range(HELD_CALLS)]
    channel = (
        grpc.aio.secure_channel(server.address, credentials)
        if credentials is not None
        else grpc.aio.insecure_channel(server.address)
    )
    await asyncio.sleep(1.0)  # the held calls have reached the server
    health = [await seconds(health_check(channel)) for _ in range(PROBES)]
    listing = [await seconds(list_teachers(channel, metadata)) for _ in range(PROBES)]
    infer_seconds = await seconds(lambda: infer(channel, infer_request(2, 16), metadata))
    still_held = sum(not call.done() for call in held)
    for call in held:
        call.cancel()
    for holder in [*holders, channel]:
        await holder.close()
    return [label, f"{still_held}", milliseconds(health), milliseconds(listing), f"{infer_seconds * 1e3:.1f}"]


def tls_environment(folder: Path) -> tuple[bytes, dict[str, str]]:
    """A CA's certificate and the environment of a TLS server (certificate for 127.0.0.1) with the token."""
    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject: str, key, issuer: x509.Name, signer, *, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "benchmark CA")])
    ca = certificate("benchmark CA", ca_key, ca_name, ca_key, ca=True)
    leaf = certificate("ekd teacher service", server_key, ca_name, ca_key, ca=False)
    (folder / "cert.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    environment = {
        TLS_CERT_FILE: str(folder / "cert.pem"),
        TLS_KEY_FILE: str(folder / "key.pem"),
        AUTH_TOKEN: TOKEN,
    }
    return ca.public_bytes(serialization.Encoding.PEM), environment


# ---- memory ----------------------------------------------------------------------------------------------


async def memory_rows(server: ServerProcess) -> list[list[str]]:
    request = infer_request(batch=60 * 10**6 // IMAGE_BYTES, size=224)
    channels = [
        grpc.aio.insecure_channel(
            server.address, options=[*LARGE_MESSAGES, ("ekd.benchmark.connection", index)]
        )
        for index in range(4)
    ]
    rows = [["before any request", "", f"{server.resident_mib():.0f}"]]
    status = await infer(channels[0], request)
    await asyncio.sleep(3)
    rows.append([f"after one request of {len(request) / 1e6:.0f} MB", status, f"{server.resident_mib():.0f}"])
    for wave in range(1, 4):
        statuses = await asyncio.gather(*(infer(channels[index % 4], request) for index in range(24)))
        await asyncio.sleep(3)
        counts = ", ".join(f"{statuses.count(name)} {name}" for name in sorted(set(statuses)))
        rows.append([f"after wave {wave} (24 at once)", counts, f"{server.resident_mib():.0f}"])
    for channel in channels:
        await channel.close()
    return rows


# ---- report ----------------------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


async def measure() -> str:
    server = ServerProcess()
    try:
        padded = await padded_rows(server)
        held = [await held_row("Infer, no token configured", server, INFER, None)]
    finally:
        server.close()
    with tempfile.TemporaryDirectory() as folder:
        ca, environment = tls_environment(Path(folder))
        server = ServerProcess(environment)
        try:
            credentials = grpc.ssl_channel_credentials(root_certificates=ca)
            token = (("authorization", f"Bearer {TOKEN}"),)
            held.append(
                await held_row(
                    "health Check without the token, TLS", server, HEALTH_CHECK, credentials, token
                )
            )
        finally:
            server.close()
    server = ServerProcess()
    try:
        memory = await memory_rows(server)
    finally:
        server.close()
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return "\n\n".join(
        [
            f"Measured {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, "
            f"load average {load}.",
            "Padded requests (a valid request, then tiny fields up to the size), each sent whole by the "
            "client (the time to answer includes the transfer); the latency of health checks made one after "
            "another from another process meanwhile, median / max:",
            table(
                ["padding", "MB", "answer", "seconds to answer", "health ms (median / max)", "checks"], padded
            ),
            f"{HELD_CALLS} calls holding headers without a request, over 10 connections; {PROBES} probes "
            "each (median / max); then one Infer of 2 images:",
            table(["held calls", "still held after", "health ms", "ListTeachers ms", "Infer ms"], held),
            "Resident memory of the server process, each read 3 s after the requests ended:",
            table(["when", "answers", "RSS MiB"], memory),
        ]
    )


def write_readme(report: str) -> None:
    text = README.read_text()
    section = f"{SECTION_START}\n{report}\n{SECTION_END}"
    if SECTION_START in text:
        before, rest = text.split(SECTION_START, 1)
        text = before + section + rest.split(SECTION_END, 1)[1]
    else:
        text = (
            text.rstrip("\n")
            + "\n\n## hostile_callers.py: can one caller freeze the teacher server or lock others out?\n\n"
            + "```\n.venv/bin/python benchmarks/hostile_callers.py [--readme]\n```\n\n"
            + "What each row does is in the script's docstring. Written by `--readme`:\n\n"
            + section
            + "\n"
        )
    README.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", action="store_true", help=f"write the tables into {README.name}")
    args = parser.parse_args()
    report = asyncio.run(measure())
    print(report)
    if args.readme:
        write_readme(report)
        print(f"\nwritten to {README}")


if __name__ == "__main__":
    main()
