"""Transport security of the teacher service: TLS for the gRPC server and its clients, and a bearer token.

Everything comes from the environment (or from files it names), never from the command line, where any user of
the machine could read it in the process list. Nothing here is ever logged. Unset, both sides run as before:
an insecure channel, no token, which is what a local run on 127.0.0.1 needs.

Server (`ServerSecurity.from_environment`):

    EKD_TLS_CERT_FILE, EKD_TLS_KEY_FILE   PEM certificate chain and private key: serve TLS (both or neither)
    EKD_TLS_CLIENT_CA_FILE                PEM CA bundle: also require a client certificate signed by it (mTLS)
    EKD_AUTH_TOKEN or EKD_AUTH_TOKEN_FILE the bearer token every RPC must carry (a file's surrounding
                                          whitespace is ignored; give one of the two, not both)

Client (`ClientSecurity.from_environment`; `services.rpc.client.TeacherClient`, `services.rpc.healthcheck`):

    EKD_TLS_CA_FILE                       PEM CA bundle that signed the server's certificate: connect with TLS
    EKD_TLS_CLIENT_CERT_FILE, EKD_TLS_CLIENT_KEY_FILE   the client certificate for mTLS (both or neither)
    EKD_TLS_SERVER_NAME                   the name to check the server certificate against, when it is not
                                          the host of the address (e.g. a Service name reached by IP)
    EKD_AUTH_TOKEN or EKD_AUTH_TOKEN_FILE the bearer token sent with every RPC

The token travels as gRPC metadata `authorization: Bearer <token>`; the server's `BearerTokenInterceptor`
compares it in constant time and ends any other call with UNAUTHENTICATED before reading its request. The
health service's Check is exempt by default, so probes need no secret (`DEFAULT_AUTH_EXEMPT_SERVICES`;
`create_server(auth_exempt_services=...)` and the serve config's `grpc.auth_exempt_services` change it, with
full service names or "/service/Method" paths). Health's Watch and reflection are not: their streams stay
open, so callers without the token could hold the server's RPC slots with them.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
from collections import namedtuple
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health

from services.core.errors import ConfigError

logger = logging.getLogger(__name__)

TLS_CERT_FILE = "EKD_TLS_CERT_FILE"
TLS_KEY_FILE = "EKD_TLS_KEY_FILE"
TLS_CLIENT_CA_FILE = "EKD_TLS_CLIENT_CA_FILE"
TLS_CA_FILE = "EKD_TLS_CA_FILE"
TLS_CLIENT_CERT_FILE = "EKD_TLS_CLIENT_CERT_FILE"
TLS_CLIENT_KEY_FILE = "EKD_TLS_CLIENT_KEY_FILE"
TLS_SERVER_NAME = "EKD_TLS_SERVER_NAME"
AUTH_TOKEN = "EKD_AUTH_TOKEN"
AUTH_TOKEN_FILE = "EKD_AUTH_TOKEN_FILE"

MIN_TOKEN_CHARACTERS = 16
PLACEHOLDER_TOKEN = "replace-with-openssl-rand-hex-32"
"""The value deploy/base/teacher-token-secret.yaml ships: refused, so that an unedited Secret fails loudly."""

AUTHORIZATION_METADATA = "authorization"
BEARER_PREFIX = "Bearer "

DEFAULT_AUTH_EXEMPT_SERVICES = (f"/{health.SERVICE_NAME}/Check",)
"""What may be called without the token: the standard health service's unary Check (probes)."""


@dataclass(frozen=True, repr=False)
class ServerSecurity:
    """The server's TLS material (PEM bytes) and token; all None: insecure, no token. `repr` shows only
    which are set."""

    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    client_ca: bytes | None = None
    token: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ConfigError(f"TLS needs both a certificate and its key ({TLS_CERT_FILE}, {TLS_KEY_FILE})")
        if self.client_ca is not None and self.certificate_chain is None:
            raise ConfigError(
                f"{TLS_CLIENT_CA_FILE} requires client certificates over TLS: set {TLS_CERT_FILE} and "
                f"{TLS_KEY_FILE} too"
            )

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> ServerSecurity:
        """Read the files and token the EKD_* variables name (module doc); ConfigError naming the variable
        when one cannot be used."""
        environ = os.environ if environ is None else environ
        return cls(
            certificate_chain=_read_named_file(environ, TLS_CERT_FILE),
            private_key=_read_named_file(environ, TLS_KEY_FILE),
            client_ca=_read_named_file(environ, TLS_CLIENT_CA_FILE),
            token=_token(environ),
        )

    @property
    def tls(self) -> bool:
        return self.certificate_chain is not None

    def credentials(self) -> grpc.ServerCredentials | None:
        """What `add_secure_port` takes; None without TLS."""
        if not self.tls:
            return None
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )

    def interceptors(self, exempt_services: Collection[str]) -> list[grpc.aio.ServerInterceptor]:
        """The server interceptors that enforce the token (none without one)."""
        return [BearerTokenInterceptor(self.token, exempt_services)] if self.token is not None else []

    def __repr__(self) -> str:
        return (
            f"ServerSecurity(tls={self.tls}, client_certificates={self.client_ca is not None}, "
            f"token={self.token is not None})"
        )


@dataclass(frozen=True, repr=False)
class ClientSecurity:
    """A client's TLS material (PEM bytes), server name override and token; all None: insecure, no token."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None
    token: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ConfigError(
                f"a client certificate needs both files ({TLS_CLIENT_CERT_FILE}, {TLS_CLIENT_KEY_FILE})"
            )
        if self.certificate_chain is not None and self.root_certificates is None:
            raise ConfigError(f"a client certificate is only sent over TLS: set {TLS_CA_FILE} too")

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> ClientSecurity:
        environ = os.environ if environ is None else environ
        return cls(
            root_certificates=_read_named_file(environ, TLS_CA_FILE),
            certificate_chain=_read_named_file(environ, TLS_CLIENT_CERT_FILE),
            private_key=_read_named_file(environ, TLS_CLIENT_KEY_FILE),
            server_name=environ.get(TLS_SERVER_NAME) or None,
            token=_token(environ),
        )

    @property
    def tls(self) -> bool:
        return self.root_certificates is not None

    def channel(self, address: str, options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
        """A channel to `address`: TLS when a CA is set, the token on every call when one is set."""
        options = list(options)
        if self.tls:
            if self.server_name is not None:
                options.append(("grpc.ssl_target_name_override", self.server_name))
            credentials = grpc.ssl_channel_credentials(
                root_certificates=self.root_certificates,
                private_key=self.private_key,
                certificate_chain=self.certificate_chain,
            )
            channel = grpc.secure_channel(address, credentials, options=options)
        else:
            channel = grpc.insecure_channel(address, options=options)
        if self.token is None:
            return channel
        if not self.tls and not is_loopback(address):
            logger.warning(
                "sending the auth token to %s without TLS: anyone on the network path can read it (set %s)",
                address,
                TLS_CA_FILE,
            )
        return grpc.intercept_channel(channel, _BearerTokenClientInterceptor(self.token))

    def __repr__(self) -> str:
        return (
            f"ClientSecurity(tls={self.tls}, client_certificate={self.certificate_chain is not None}, "
            f"server_name={self.server_name!r}, token={self.token is not None})"
        )


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Ends every RPC that lacks `authorization: Bearer <token>` with UNAUTHENTICATED, before its request is
    read, except those `exempt_services` names: a full service name exempts its every method
    ("grpc.health.v1.Health"), a "/service/Method" path one method ("/grpc.health.v1.Health/Check")."""

    def __init__(self, token: str, exempt_services: Collection[str]) -> None:
        if not token:
            raise ValueError("the bearer token must not be empty")
        self._expected = (BEARER_PREFIX + token).encode()
        self._exempt = frozenset(exempt_services)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        service = method.lstrip("/").rpartition("/")[0]
        exempt = service in self._exempt or method in self._exempt
        if exempt or self._authorized(handler_call_details.invocation_metadata or ()):
            return await continuation(handler_call_details)
        return _REFUSE

    def _authorized(self, metadata: Sequence[tuple[str, str | bytes]]) -> bool:
        presented = [value for key, value in metadata if key == AUTHORIZATION_METADATA]
        if len(presented) != 1:
            return False
        value = presented[0]
        value = value if isinstance(value, bytes) else value.encode()
        return hmac.compare_digest(value, self._expected)


async def _refuse(request_iterator, context: grpc.aio.ServicerContext) -> None:
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        f"missing or wrong bearer token: send metadata '{AUTHORIZATION_METADATA}: {BEARER_PREFIX}<token>' "
        f"(clients read it from {AUTH_TOKEN} or {AUTH_TOKEN_FILE})",
    )


# A stream-request handler, whatever the method's real kind: it ends the call without reading the request, so
# an unauthenticated caller cannot make the server parse (or wait for) a large message.
_REFUSE = grpc.stream_unary_rpc_method_handler(_refuse)


class _BearerTokenClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call's metadata."""

    def __init__(self, token: str) -> None:
        self._metadata = (AUTHORIZATION_METADATA, BEARER_PREFIX + token)

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(
            method=details.method,
            timeout=details.timeout,
            metadata=[*(details.metadata or ()), self._metadata],
            credentials=details.credentials,
            wait_for_ready=details.wait_for_ready,
            compression=details.compression,
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)


class _CallDetails(
    namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    """grpc.ClientCallDetails with the fields set (grpc's own class has none to construct)."""

    def __repr__(self) -> str:  # the metadata holds the token
        return f"_CallDetails(method={self.method!r})"


def is_loopback(address: str) -> bool:
    """Whether host:port (or [v6]:port) names this machine only: localhost or a loopback IP."""
    host = address.rpartition(":")[0] if ":" in address else address
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_named_file(environ: Mapping[str, str], variable: str) -> bytes | None:
    path = environ.get(variable)
    if not path:
        return None
    return _read_file(variable, path)


def _read_file(variable: str, path: str) -> bytes:
    """The content of the file `variable` names (`path`); ConfigError when it cannot be read or is empty."""
    try:
        content = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"{variable}: cannot read {path}: {error.strerror or error}") from None
    if not content.strip():
        raise ConfigError(f"{variable}: {path} is empty")
    return content


def _token(environ: Mapping[str, str]) -> str | None:
    inline, path = environ.get(AUTH_TOKEN), environ.get(AUTH_TOKEN_FILE)
    if inline and path:
        raise ConfigError(f"give the token one way: {AUTH_TOKEN} or {AUTH_TOKEN_FILE}, not both")
    if path:
        token = _read_file(AUTH_TOKEN_FILE, path).decode().strip()
    elif inline:
        token = inline.strip()
    else:
        return None
    if not token or any(ord(char) < 0x21 or ord(char) > 0x7E for char in token):
        # Metadata values must be printable ASCII; a token with spaces or controls would never match.
        raise ConfigError(
            f"{AUTH_TOKEN_FILE if path else AUTH_TOKEN}: the token must be printable ASCII without spaces"
        )
    if len(token) < MIN_TOKEN_CHARACTERS or token == PLACEHOLDER_TOKEN:
        raise ConfigError(
            f"{AUTH_TOKEN_FILE if path else AUTH_TOKEN}: the token must be a secret of at least "
            f"{MIN_TOKEN_CHARACTERS} characters, not the manifests' placeholder; make one with "
            "`openssl rand -hex 32`"
        )
    return token
