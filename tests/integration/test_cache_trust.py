"""Trust nothing read back: values of the wrong kind and forged values planted in real LMDB and Redis caches
never reach a fetch's results; the service answers instead, the value is counted corrupt and replaced. And
the cache over TLS (`rediss://`) against a real TLS redis-server with a certificate made here.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.cache import (
    CacheUnavailableError,
    TeacherOutputStore,
    ValueSpec,
    input_digests,
    open_store,
    output_key,
)
from services.cache.authentication import (
    HMAC_KEY_ENV,
    HMAC_KEY_FILE_ENV,
    TAG_BYTES,
    hmac_key_from_environment,
)
from services.cache.local_redis import TlsFiles, running_redis_server
from services.cache.redis_store import RedisStore
from services.core.errors import ConfigError
from services.formats.codec import encode_value
from services.formats.soft_labels import compress
from services.rpc.backends import LocalBackend
from services.rpc.client import TeacherClient
from services.rpc.server import BackgroundServer
from services.teachers.engine import TeacherEngine

pytestmark = [pytest.mark.integration, pytest.mark.faults]

DEADLINE_SECONDS = 20.0
NUM_CLASSES = 10
SECRET = "correct horse battery staple 0123"


def images(seed: int, batch: int = 4) -> torch.Tensor:
    return torch.randint(
        0, 256, (batch, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def logits_keys(engine: TeacherEngine, batch: torch.Tensor) -> list[bytes]:
    return [output_key(engine.spec.identity, "logits", "float16", 0, d) for d in input_digests(batch)]


OpenStore = Callable[..., TeacherOutputStore]


@pytest.fixture(params=["lmdb", "redis"])
def open_backend(request, tmp_path) -> Iterator[OpenStore]:
    """Open stores of one cache of this test's own: `open_backend(hmac_key=...)`, closed after the test. In
    one process every LMDB store of a directory shares its environment, so a second store is a second writer
    of the same cache, as a second Redis client is."""
    opened = []

    def open_one(**options) -> TeacherOutputStore:
        if request.param == "lmdb":
            opened.append(open_store(str(tmp_path / "cache"), **options))
        else:
            url = request.getfixturevalue("redis_url")
            opened.append(open_store(url, key_prefix=f"{request.node.name}:", **options))
        return opened[-1]

    yield open_one
    for store in opened:
        store.close()


def assert_served(fetched: dict, engine: TeacherEngine, batch: torch.Tensor) -> None:
    expected = engine.infer(batch, ["logits"])["logits"]
    torch.testing.assert_close(fetched["a"]["logits"], expected, rtol=2e-3, atol=1e-3)


# ---- values of the wrong kind ------------------------------------------------------------------------------


def test_values_of_the_wrong_dtype_or_shape_are_corrupt_deleted_and_served_instead(engines, open_backend):
    store = open_backend(hmac_key=None)
    batch = images(1)
    keys = logits_keys(engines["a"], batch)
    planted = [
        torch.zeros(7, dtype=torch.float16),  # another output's shape
        torch.zeros(NUM_CLASSES, dtype=torch.float32),  # float32 where fp16 is keyed
        compress(torch.zeros(1, NUM_CLASSES)),  # the compact form under a full key
    ]
    store.put_many(list(zip(keys, planted, strict=False)))
    with (
        BackgroundServer(LocalBackend(engines), store=store) as service,
        TeacherClient(service.address, store=store, timeout_seconds=DEADLINE_SECONDS) as client,
    ):
        fetched = client.fetch(batch, ["a"], ["logits"])
        assert_served(fetched, engines["a"], batch)
        assert client.stats.cache_corrupt == 3 and client.stats.cache_hits == 0
        assert service.running.servicer.wait_for_cache_writes()
        # Gone: the service found plain misses and wrote its own values in their place.
        spec = ValueSpec.full("float16", (NUM_CLASSES,))
        replaced = store.get_many(keys, [spec] * len(keys))
        assert all(value is not None for value in replaced)
        assert torch.equal(torch.stack(replaced).float(), fetched["a"]["logits"])
        assert store.stats.corrupt == 3


def test_the_servicer_checks_what_it_reads_too(engines, open_backend):
    store = open_backend(hmac_key=None)
    batch = images(2)
    keys = logits_keys(engines["a"], batch)
    store.put_many([(keys[0], torch.zeros(3, 3, dtype=torch.float16)), (keys[1], torch.zeros(10))])
    with (
        BackgroundServer(LocalBackend(engines), store=store) as service,
        TeacherClient(service.address, timeout_seconds=DEADLINE_SECONDS) as client,  # no store: all served
    ):
        assert_served(client.fetch(batch, ["a"], ["logits"]), engines["a"], batch)
        metric = service.running.metrics.registry.get_sample_value
        assert metric("ekd_cache_corrupt_total", {"teacher": "a"}) == 2
        assert metric("ekd_cache_hits_total", {"teacher": "a"}) == 0


# ---- authenticated values ----------------------------------------------------------------------------------


def test_forged_values_are_rejected_and_genuine_ones_round_trip(engines, open_backend, monkeypatch):
    monkeypatch.setenv(HMAC_KEY_ENV, SECRET)
    store = open_backend()  # the secret from the environment
    forger = open_backend(hmac_key=None)  # can write to the backend, does not know the secret
    other_secret = open_backend(hmac_key=b"another secret of 32 bytes......")
    assert store.authenticated and not forger.authenticated
    batch = images(3)
    keys = logits_keys(engines["a"], batch)
    forged = torch.full((NUM_CLASSES,), 9.0, dtype=torch.float16)  # the right frame, dtype and shape
    forger.put_many([(keys[0], forged), (keys[1], forged)])
    other_secret.put_many([(keys[2], forged)])
    with (
        BackgroundServer(LocalBackend(engines), store=store) as service,
        TeacherClient(service.address, store=store, timeout_seconds=DEADLINE_SECONDS) as client,
    ):
        first = client.fetch(batch, ["a"], ["logits"])
        assert_served(first, engines["a"], batch)
        assert client.stats.cache_corrupt == 3
        assert service.running.servicer.wait_for_cache_writes()
        second = client.fetch(batch, ["a"], ["logits"])  # the genuine values, written by the service
        assert client.stats.cache_hits == 4
        assert torch.equal(second["a"]["logits"], first["a"]["logits"])
    # The forger reads the service's tagged values as corrupt: it can neither use nor imitate them.
    assert forger.get_many(keys[3:]) == [None] and forger.stats.corrupt == 1


def test_a_tag_binds_its_value_to_its_key(open_backend):
    store = open_backend(hmac_key=SECRET.encode())
    first, second = (output_key("t", "logits", "float16", 0, bytes([n]) * 16) for n in (1, 2))
    value = torch.arange(NUM_CLASSES, dtype=torch.float16)
    store.put_many([(first, value)])
    stored = store._get_raw([first])[0]
    assert len(stored) == len(encode_value(value)) + TAG_BYTES
    store._put_raw([(second, stored)])  # a genuine value copied under another key
    assert torch.equal(store.get_many([first])[0], value)
    assert store.get_many([second]) == [None] and store.stats.corrupt == 1


def test_compact_values_carry_the_tag_too(open_backend):
    store = open_backend(hmac_key=SECRET.encode())
    compact = compress(torch.randn(2, 1000, generator=torch.Generator().manual_seed(0)) * 3)
    keys = [output_key("t", "logits", "float16", 0, bytes([n]) * 16, form="compact") for n in (1, 2)]
    store.put_many([(key, compact[i]) for i, key in enumerate(keys)])
    assert store.stats.bytes_written == 2 * (63 + TAG_BYTES)
    read = store.get_many(keys, [ValueSpec.compact(1000)] * 2)
    assert all(torch.equal(value.indices, compact[i].indices) for i, value in enumerate(read))


def test_the_secret_comes_from_the_environment_and_never_shows(tmp_path, monkeypatch):
    assert hmac_key_from_environment({}) is None
    assert hmac_key_from_environment({HMAC_KEY_ENV: SECRET}) == SECRET.encode()
    key_file = tmp_path / "hmac"
    key_file.write_text(SECRET + "\n")
    assert hmac_key_from_environment({HMAC_KEY_FILE_ENV: str(key_file)}) == SECRET.encode()
    with pytest.raises(ConfigError, match=f"set one of {HMAC_KEY_ENV} and {HMAC_KEY_FILE_ENV}"):
        hmac_key_from_environment({HMAC_KEY_ENV: SECRET, HMAC_KEY_FILE_ENV: str(key_file)})
    with pytest.raises(ConfigError, match=f"{HMAC_KEY_FILE_ENV} names .*absent, which cannot be read"):
        hmac_key_from_environment({HMAC_KEY_FILE_ENV: str(tmp_path / "absent")})
    with pytest.raises(ConfigError, match=f"in {HMAC_KEY_ENV} has 6 bytes; use at least 16") as short:
        hmac_key_from_environment({HMAC_KEY_ENV: "s3cret"})
    assert "s3cret" not in str(short.value)
    monkeypatch.setenv(HMAC_KEY_FILE_ENV, str(key_file))
    with open_store(str(tmp_path / "cache")) as store:
        assert store.authenticated
    with open_store(str(tmp_path / "other"), hmac_key=None) as store:
        assert not store.authenticated


# ---- rediss:// ---------------------------------------------------------------------------------------------


def self_signed(directory: Path, name: str) -> TlsFiles:
    """A certificate for 127.0.0.1 that is its own CA."""
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
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return TlsFiles(cert=cert, key=key_path, ca=cert)


def test_rediss_end_to_end_and_the_certificate_is_checked(engines, tmp_path):
    tls = self_signed(tmp_path / "tls", "redis")
    with running_redis_server(tmp_path / "redis", tls=tls) as server:
        assert server.url.startswith("rediss://127.0.0.1:") and f"ssl_ca_certs={tls.ca}" in server.url
        with (
            open_store(server.url) as service_store,
            open_store(server.url) as client_store,
            BackgroundServer(LocalBackend(engines), store=service_store) as service,
            TeacherClient(service.address, store=client_store, timeout_seconds=DEADLINE_SECONDS) as client,
        ):
            assert isinstance(client_store, RedisStore)
            batch = images(4)
            first = client.fetch(batch, ["a"], ["logits"])
            assert service.running.servicer.wait_for_cache_writes()
            second = client.fetch(batch, ["a"], ["logits"])
            assert client.stats.cache_hits == 4 and torch.equal(first["a"]["logits"], second["a"]["logits"])
        stranger = self_signed(tmp_path / "other", "stranger")
        with pytest.raises(CacheUnavailableError, match="certificate verify failed"):
            open_store(server.url.replace(str(tls.ca), str(stranger.ca)))
        with pytest.raises(CacheUnavailableError, match="is unavailable"):
            open_store(server.url.replace("rediss://", "redis://").split("?")[0])
