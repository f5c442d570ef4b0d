"""The teacher-output store on a Redis Cluster: a bank larger than one node's memory, spread over its shards
by hash slot.

The URI lists one or more of the cluster's nodes (the client discovers the others and the slot map from any
one that answers): `redis+cluster://[:password@]host:port[,host:port...]/`, or `rediss+cluster://...` for
TLS, with the query parameters one Redis takes (`services.cache.redis_store.ALLOWED_QUERY`). A cluster has one
database, so the path is empty, `/` or `/0`.

Everything but the client is one Redis's code (`RedisBackedStore`): the same timeouts, HMAC, checks and error
translation, so `services.cache.guard`'s breaker treats the cluster as one store. A multi-get is split by hash
slot (redis-py's `mget_nonatomic`: one MGET per slot, pipelined per node); writes and deletes are grouped per
node the same way. A scan walks every primary, so `ekd cache stats` counts every shard.

A shard that stops answering fails the calls that touch it, and the store pings every primary: the breaker
opens and the cache reads as misses (the run computes its targets) until every shard answers again. Without
replicas a cluster also stops serving once it notices the lost shard (`cluster-require-full-coverage`); run
one replica per shard (`--cluster-replicas 1`, deploy/redis-cluster/) to keep serving through a lost node.
"""

from __future__ import annotations

import functools
from typing import cast
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.cluster import ClusterNode, RedisCluster

from services.cache.redis_store import (
    DEFAULT_CONNECT_TIMEOUT_SECONDS,
    DEFAULT_SOCKET_TIMEOUT_SECONDS,
    RedisBackedStore,
    connection_retry,
)
from services.core.redaction import redact

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
"""The cluster URI's schemes and the one-node scheme each stands for."""


def _node(address: str, uri: str) -> ClusterNode:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"bad Redis Cluster URI {redact(uri)!r}: {address!r} is not host:port")
    return ClusterNode(host, int(port))


def seed_nodes(uri: str) -> tuple[str, list[ClusterNode]]:
    """The one-node URL redis-py reads (credentials, TLS and query from `uri`, and its first node) and the
    other nodes it may discover the cluster from."""
    parts = urlsplit(uri)
    scheme = CLUSTER_SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        raise ValueError(
            f"bad Redis Cluster URI {redact(uri)!r}: the scheme is {' or '.join(CLUSTER_SCHEMES)}"
        )
    if parts.path not in ("", "/", "/0") or parts.fragment:
        raise ValueError(
            f"bad Redis Cluster URI {redact(uri)!r}: a cluster has one database; end the node list with / "
            "and nothing else but a ?query"
        )
    credentials, _, addresses = parts.netloc.rpartition("@")
    nodes = [_node(address, uri) for address in addresses.split(",")]
    first = f"{credentials}@{addresses.split(',')[0]}" if credentials else addresses.split(",")[0]
    return urlunsplit((scheme, first, "/0", parts.query, "")), nodes[1:]


class RedisClusterStore(RedisBackedStore):
    """Teacher outputs in the Redis Cluster at `uri` (see the module doc); the options as `RedisStore`'s.

    The primaries are pinged on open, so a wrong URI fails here; with `ping_on_open` False the first call
    finds out instead (discovering the cluster then).
    """

    def __init__(
        self,
        uri: str,
        ttl_seconds: int | None = None,
        key_prefix: str = "",
        connect_timeout_seconds: float = DEFAULT_CONNECT_TIMEOUT_SECONDS,
        socket_timeout_seconds: float = DEFAULT_SOCKET_TIMEOUT_SECONDS,
        hmac_key: bytes | None = None,
        ping_on_open: bool = True,
    ) -> None:
        super().__init__(uri, ttl_seconds, key_prefix, hmac_key)
        url, other_nodes = seed_nodes(uri)
        self._connect = functools.partial(
            RedisCluster,
            url=url,
            startup_nodes=other_nodes,
            socket_connect_timeout=connect_timeout_seconds,
            socket_timeout=socket_timeout_seconds,
            # Retries of a failed cluster command (after a topology refresh): one, as for one Redis.
            retry=connection_retry(),
        )
        self._cluster: RedisCluster | None = None
        if ping_on_open:
            self.ping()

    @property
    def _client(self) -> RedisCluster:
        """The cluster client, made on first use: making it asks a node for the slot map."""
        if self._cluster is None:
            with self._translated_errors():
                try:
                    self._cluster = self._connect()
                except ValueError as error:
                    raise ValueError(f"bad Redis Cluster URI {self.url!r}: {error}") from None
        return self._cluster

    def ping(self) -> None:
        # Every primary: one lost shard is an outage of the store; the breaker stays open until it is back.
        with self._translated_errors():
            self._client.ping(target_nodes=RedisCluster.PRIMARIES)

    def _get_prefixed(self, keys: list[bytes]) -> list[bytes | None]:
        # Bytes, never str: decode_responses stays off (see `RedisStore`).
        return cast(list[bytes | None], self._client.mget_nonatomic(keys))

    def _scanned_servers(self) -> list[redis.Redis]:
        return [self._client.get_redis_connection(node) for node in self._client.get_primaries()]

    def close(self) -> None:
        if self._cluster is not None:
            self._cluster.close()
