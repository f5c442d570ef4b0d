"""`open_store(uri)`: the one door from a cache URI to its backend (LMDB, Redis or a Redis Cluster).

Kept apart from `store.py` because it imports both backends, which import the interface from there.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from services.cache.authentication import hmac_key_from_environment
from services.cache.lmdb_store import LmdbStore
from services.cache.redis_cluster_store import CLUSTER_SCHEMES, RedisClusterStore
from services.cache.redis_store import RedisStore
from services.cache.store import TeacherOutputStore
from services.core.errors import ConfigError
from services.core.redaction import redact

_ALLOWED_URIS = (
    "lmdb:///absolute/path, a plain filesystem path, redis://[:password@]host:port/db or rediss://..., "
    "redis+cluster://[:password@]host:port[,host:port...]/ or rediss+cluster://..."
)


def open_store(uri: str, **options) -> TeacherOutputStore:
    """Open the store a URI names: "lmdb:///abs/path" or a plain path -> LmdbStore; "redis://..." or
    "rediss://..." -> RedisStore; "redis+cluster://host:port,host:port/" or "rediss+cluster://..." ->
    RedisClusterStore. `options` go to the backend's constructor. Unless they name `hmac_key`
    (None: unauthenticated), values are authenticated with the secret `EKD_CACHE_HMAC_KEY` or
    `EKD_CACHE_HMAC_KEY_FILE` configures, when one does (`services.cache.authentication`). A URI or options
    the backend refuses are a ConfigError."""
    if not uri:
        raise ConfigError(f"empty cache URI; allowed forms: {_ALLOWED_URIS}")
    if "hmac_key" not in options:
        options["hmac_key"] = hmac_key_from_environment()
    try:
        return _opened(uri, options)
    except ConfigError:
        raise
    except ValueError as error:  # the backend's word on its URI or options: an unknown query parameter, ...
        raise ConfigError(str(error)) from error


def _opened(uri: str, options: dict) -> TeacherOutputStore:
    if "://" not in uri:
        return LmdbStore(uri, **options)
    scheme = uri.split("://", 1)[0].lower()
    if scheme in ("redis", "rediss"):
        return RedisStore(uri, **options)
    if scheme in CLUSTER_SCHEMES:
        return RedisClusterStore(uri, **options)
    if scheme == "lmdb":
        parts = urlsplit(uri)
        if parts.netloc or not parts.path.startswith("/") or parts.query or parts.fragment:
            raise ConfigError(f"bad LMDB cache URI {uri!r}: use lmdb:///absolute/path (three slashes)")
        return LmdbStore(parts.path, **options)
    raise ConfigError(f"unsupported cache URI {redact(uri)!r}; allowed forms: {_ALLOWED_URIS}")
