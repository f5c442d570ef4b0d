"""TLS and the bearer token between the teacher server and its clients, over real gRPC on 127.0.0.1, with
certificates made in the test (a CA, a server certificate for 127.0.0.1, a client certificate, and a second,
unrelated CA)."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services._generated import teacher_pb2, teacher_pb2_grpc
from services.core.errors import ConfigError
from services.rpc import healthcheck
from services.rpc.backends import LocalBackend
from services.rpc.client import TeacherClient, TeacherServiceError, TeacherServiceUnavailable
from services.rpc.security import (
    AUTH_TOKEN,
    AUTH_TOKEN_FILE,
    PLACEHOLDER_TOKEN,
    TLS_CA_FILE,
    TLS_CERT_FILE,
    TLS_KEY_FILE,
    ClientSecurity,
    ServerSecurity,
    is_loopback,
)
from services.rpc.server import BackgroundServer
from services.teachers.engine import TeacherEngine
from services.teachers.spec import Preprocessing
from services.teachers.zoo import create_teacher

pytestmark = [pytest.mark.integration, pytest.mark.faults]

DEADLINE_SECONDS = 20.0
TOKEN = "s3cret-token-for-tests"


@dataclass(frozen=True)
class Pem:
    certificate: bytes
    key: bytes


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(name: str) -> tuple[Pem, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Pem(certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key)), certificate, key


def make_leaf(ca: x509.Certificate, ca_key, name: str, *, server: bool) -> Pem:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    certificate = builder.sign(ca_key, hashes.SHA256())
    return Pem(certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key))


@dataclass(frozen=True)
class Pki:
    ca: Pem
    server: Pem
    client: Pem
    other_ca: Pem


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca, ca_certificate, ca_key = make_ca("ekd test CA")
    other_ca, _, _ = make_ca("some other CA")
    return Pki(
        ca=ca,
        server=make_leaf(ca_certificate, ca_key, "ekd teacher service", server=True),
        client=make_leaf(ca_certificate, ca_key, "ekd trainer", server=False),
        other_ca=other_ca,
    )


@pytest.fixture(scope="module")
def backend() -> LocalBackend:
    torch.manual_seed(0)
    engine = TeacherEngine(create_teacher("cifar_resnet20", 10, preprocessing=Preprocessing.cifar(16)))
    return LocalBackend({"t": engine})


@pytest.fixture
def serve(backend) -> Iterator:
    servers = []

    def start(security: ServerSecurity, **options) -> BackgroundServer:
        servers.append(
            BackgroundServer(backend, timeout_seconds=DEADLINE_SECONDS, security=security, **options)
        )
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def teachers(address: str, security: ClientSecurity) -> list[str]:
    with TeacherClient(address, security=security, retries=0, timeout_seconds=5.0) as client:
        return list(client.teachers())


def images() -> torch.Tensor:
    return torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)


# ---- TLS -------------------------------------------------------------------------------------------------


def test_tls_serves_a_client_that_trusts_the_ca_and_refuses_one_that_does_not(serve, pki):
    server = serve(ServerSecurity(certificate_chain=pki.server.certificate, private_key=pki.server.key))
    trusting = ClientSecurity(root_certificates=pki.ca.certificate)
    assert teachers(server.address, trusting) == ["t"]
    with TeacherClient(server.address, security=trusting, timeout_seconds=DEADLINE_SECONDS) as client:
        assert client.fetch(images(), ["t"], ["logits"])["t"]["logits"].shape == (2, 10)
    with pytest.raises(TeacherServiceUnavailable):
        teachers(server.address, ClientSecurity(root_certificates=pki.other_ca.certificate))
    with pytest.raises(TeacherServiceUnavailable):  # a plaintext client cannot talk to a TLS server
        teachers(server.address, ClientSecurity())
    assert healthcheck.probe(server.address, security=trusting)[0]
    assert not healthcheck.probe(server.address, security=ClientSecurity(), timeout=2)[0]


def test_mutual_tls_requires_a_client_certificate_signed_by_the_client_ca(serve, pki):
    server = serve(
        ServerSecurity(
            certificate_chain=pki.server.certificate, private_key=pki.server.key, client_ca=pki.ca.certificate
        )
    )
    with_certificate = ClientSecurity(
        root_certificates=pki.ca.certificate,
        certificate_chain=pki.client.certificate,
        private_key=pki.client.key,
    )
    assert teachers(server.address, with_certificate) == ["t"]
    with pytest.raises(TeacherServiceUnavailable):
        teachers(server.address, ClientSecurity(root_certificates=pki.ca.certificate))


# ---- bearer token ----------------------------------------------------------------------------------------


def test_token_is_required_for_the_teacher_service_but_not_for_health(serve, pki):
    tls = dict(certificate_chain=pki.server.certificate, private_key=pki.server.key)
    server = serve(ServerSecurity(**tls, token=TOKEN))
    ca = pki.ca.certificate
    assert teachers(server.address, ClientSecurity(root_certificates=ca, token=TOKEN)) == ["t"]
    for token in (None, "wrong", TOKEN + "x"):
        with pytest.raises(TeacherServiceError) as failure:
            teachers(server.address, ClientSecurity(root_certificates=ca, token=token))
        assert failure.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert TOKEN not in str(failure.value)
    assert healthcheck.probe(server.address, security=ClientSecurity(root_certificates=ca))[0]


def test_infer_without_the_token_is_refused_and_with_it_served(serve):
    server = serve(ServerSecurity(token=TOKEN))
    payload = images()
    request = teacher_pb2.InferRequest(
        teachers=["t"],
        images=teacher_pb2.Tensor(
            dtype=teacher_pb2.UINT8, shape=list(payload.shape), data=payload.numpy().tobytes()
        ),
    )
    with grpc.insecure_channel(server.address) as channel:
        stub = teacher_pb2_grpc.TeacherServiceStub(channel)
        with pytest.raises(grpc.RpcError) as failure:
            list(stub.Infer(request, timeout=DEADLINE_SECONDS))
        assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "missing or wrong bearer token" in failure.value.details()
        metadata = [("authorization", f"Bearer {TOKEN}")]
        responses = list(stub.Infer(request, timeout=DEADLINE_SECONDS, metadata=metadata))
    assert sum(response.count for response in responses) == 2
    assert server.running.metrics.registry.get_sample_value("ekd_requests_total", {"teacher": "t"}) == 1


def test_only_health_check_is_exempt_the_open_streams_need_the_token(serve):
    """Health's Watch and reflection hold a stream open: without the token they would let anyone fill the
    server's RPC slots, so by default only the unary Check is exempt."""
    server = serve(ServerSecurity(token=TOKEN))
    assert healthcheck.probe(server.address, security=ClientSecurity())[0]
    with grpc.insecure_channel(server.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=5)
        with pytest.raises(grpc.RpcError) as failure:
            next(watch)
        assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        with pytest.raises(grpc.RpcError) as failure:
            next(reflection)
        assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_needs_the_token_when_not_exempt(serve):
    server = serve(ServerSecurity(token=TOKEN), auth_exempt_services=())
    serving, message = healthcheck.probe(server.address, security=ClientSecurity(), timeout=5)
    assert not serving and "UNAUTHENTICATED" in message
    assert healthcheck.probe(server.address, security=ClientSecurity(token=TOKEN))[0]


# ---- configuration from the environment ------------------------------------------------------------------


def test_security_is_read_from_the_environment_and_never_shown(
    tmp_path: Path, pki, serve, monkeypatch, capsys
):
    files = {
        "cert.pem": pki.server.certificate,
        "key.pem": pki.server.key,
        "ca.pem": pki.ca.certificate,
        "token": f"  {TOKEN}\n".encode(),
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    server_environment = {
        TLS_CERT_FILE: str(tmp_path / "cert.pem"),
        TLS_KEY_FILE: str(tmp_path / "key.pem"),
        AUTH_TOKEN_FILE: str(tmp_path / "token"),
    }
    security = ServerSecurity.from_environment(server_environment)
    assert security.tls and security.token == TOKEN
    assert TOKEN not in repr(security) and "PRIVATE" not in repr(security)
    server = serve(security)

    for variable, value in {TLS_CA_FILE: str(tmp_path / "ca.pem"), AUTH_TOKEN: TOKEN}.items():
        monkeypatch.setenv(variable, value)
    assert teachers(server.address, ClientSecurity.from_environment()) == ["t"]
    with TeacherClient(server.address, retries=0) as client:  # the default: from the environment
        assert list(client.teachers()) == ["t"]
    assert healthcheck.main([server.address]) == 0
    assert TOKEN not in repr(ClientSecurity.from_environment())
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err


@pytest.mark.parametrize(
    ("environment", "named"),
    [
        ({TLS_CERT_FILE: "/nonexistent/cert.pem", TLS_KEY_FILE: "/nonexistent/key.pem"}, TLS_CERT_FILE),
        ({AUTH_TOKEN: "a", AUTH_TOKEN_FILE: "/nonexistent/token"}, AUTH_TOKEN_FILE),
        ({AUTH_TOKEN: "has space"}, AUTH_TOKEN),
        ({AUTH_TOKEN: "short"}, AUTH_TOKEN),
        ({AUTH_TOKEN: PLACEHOLDER_TOKEN}, AUTH_TOKEN),  # the manifests' Secret, unedited
    ],
)
def test_unusable_server_environment_is_a_config_error_naming_the_variable(environment, named):
    with pytest.raises(ConfigError, match=named):
        ServerSecurity.from_environment(environment)


def test_half_configured_tls_is_a_config_error(tmp_path: Path, pki):
    (tmp_path / "cert.pem").write_bytes(pki.server.certificate)
    with pytest.raises(ConfigError, match=TLS_KEY_FILE):
        ServerSecurity.from_environment({TLS_CERT_FILE: str(tmp_path / "cert.pem")})


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("localhost:1", True),
        ("[::1]:50051", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        ("ray-head:50051", False),
        ("10.0.0.5:50051", False),
    ],
)
def test_loopback_addresses(address, loopback):
    assert is_loopback(address) is loopback
