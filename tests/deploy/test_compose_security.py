"""The compose stack's transport security: the teacher service serves TLS and wants the bearer token, both
from Docker secrets (files under ./secrets, never values in the compose file), and its clients (the trainer,
the ray-head healthcheck) trust the CA and send the token. The dev-secrets script's output works end to end:
a real server with that certificate and token, and the healthcheck and a client with the client side."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from deploy_files import REPO, compose_config

from services.rpc import healthcheck
from services.rpc.backends import LocalBackend
from services.rpc.client import TeacherClient, TeacherServiceError
from services.rpc.security import (
    AUTH_TOKEN_FILE,
    TLS_CA_FILE,
    TLS_CERT_FILE,
    TLS_KEY_FILE,
    ClientSecurity,
    ServerSecurity,
)
from services.rpc.server import BackgroundServer
from services.teachers.engine import TeacherEngine
from services.teachers.spec import Preprocessing
from services.teachers.zoo import create_teacher

pytestmark = pytest.mark.integration

SECRETS = "/run/secrets/"


@pytest.fixture(scope="module")
def compose() -> dict:
    return compose_config("docker-compose.yml")


def secret_files(compose: dict, service: str) -> dict[str, str]:
    """Secret name -> the repository file it comes from, for each secret `service` mounts."""
    names = [
        entry["source"] if isinstance(entry, dict) else entry
        for entry in compose["services"][service]["secrets"]
    ]
    return {name: str(Path(compose["secrets"][name]["file"]).relative_to(REPO)) for name in names}


def test_ray_head_serves_tls_with_the_token_from_secret_files(compose):
    head = compose["services"]["ray-head"]
    env = head["environment"]
    assert env[TLS_CERT_FILE] == SECRETS + "ekd-server-cert"
    assert env[TLS_KEY_FILE] == SECRETS + "ekd-server-key"
    assert env[AUTH_TOKEN_FILE] == SECRETS + "ekd-token"
    assert env[TLS_CA_FILE] == SECRETS + "ekd-ca"  # its healthcheck is a client of its own server
    assert secret_files(compose, "ray-head") == {
        "ekd-server-cert": "secrets/server.crt",
        "ekd-server-key": "secrets/server.key",
        "ekd-ca": "secrets/ca.crt",
        "ekd-token": "secrets/token",
    }


def test_trainer_trusts_the_ca_and_sends_the_token_but_holds_no_server_key(compose):
    trainer = compose["services"]["trainer"]
    env = trainer["environment"]
    assert env[TLS_CA_FILE] == SECRETS + "ekd-ca"
    assert env[AUTH_TOKEN_FILE] == SECRETS + "ekd-token"
    assert TLS_KEY_FILE not in env
    assert set(secret_files(compose, "trainer")) == {"ekd-ca", "ekd-token"}


def test_no_secret_value_is_in_the_compose_files(compose):
    for service in compose["services"].values():
        for name in service.get("environment", {}):
            assert name != "EKD_AUTH_TOKEN", "the token comes from a file, never inline"
    assert "secrets/" in (REPO / ".gitignore").read_text()


def test_dev_secrets_serve_tls_and_the_token_end_to_end(tmp_path, monkeypatch):
    directory = tmp_path / "secrets"
    subprocess.run(
        ["bash", str(REPO / "scripts" / "make_dev_secrets.sh"), str(directory)],
        check=True,
        capture_output=True,
    )
    token = (directory / "token").read_text().strip()
    server_security = ServerSecurity.from_environment(
        {
            TLS_CERT_FILE: str(directory / "server.crt"),
            TLS_KEY_FILE: str(directory / "server.key"),
            AUTH_TOKEN_FILE: str(directory / "token"),
        }
    )
    torch.manual_seed(0)
    engine = TeacherEngine(create_teacher("cifar_resnet20", 10, preprocessing=Preprocessing.cifar(16)))
    with BackgroundServer(LocalBackend({"t": engine}), security=server_security) as server:
        monkeypatch.setenv(TLS_CA_FILE, str(directory / "ca.crt"))
        # What the healthcheck of ray-head runs: 127.0.0.1 is in the certificate; health needs no token.
        assert healthcheck.main([server.address, "--timeout", "5"]) == 0
        with pytest.raises(TeacherServiceError, match="UNAUTHENTICATED"):
            TeacherClient(server.address, retries=0).teachers()
        monkeypatch.setenv(AUTH_TOKEN_FILE, str(directory / "token"))
        assert ClientSecurity.from_environment().token == token
        with TeacherClient(server.address, retries=0) as client:
            assert list(client.teachers()) == ["t"]
    # Made once: a second run keeps what is there.
    before = {path.name: path.read_bytes() for path in directory.iterdir()}
    subprocess.run(
        ["bash", str(REPO / "scripts" / "make_dev_secrets.sh"), str(directory)],
        check=True,
        capture_output=True,
    )
    assert {path.name: path.read_bytes() for path in directory.iterdir()} == before
