"""Prometheus metrics of a teacher server (`ekd_*`), kept in a registry of their own.

Each `Metrics` owns a `CollectorRegistry` instead of using prometheus_client's global one, so that several
servers (in tests, or one per teacher host process) never clash over metric names. Names follow the Prometheus
conventions: counters end in `_total` (prometheus_client appends it), durations are in seconds.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

NO_TEACHER = ""
"""The `teacher` label of a request that names no hosted teacher (a teacher name is never empty)."""

# Samples per forward pass: powers of two up to past the default max_batch_size of 512.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# From a cached answer (milliseconds) to a large batch through a big CPU model (tens of seconds).
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The teacher server's metrics, registered in `registry` (a new one by default)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "ekd_requests",
            "Infer requests received, per requested teacher (an ensemble counts for each).",
            ["teacher"],
            registry=self.registry,
        )
        self.request_errors = Counter(
            "ekd_request_errors",
            "Infer requests that ended with a non-OK status, by status code.",
            ["teacher", "code"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "ekd_request_seconds",
            "Wall time of whole RPCs, from receipt to the last message, by method.",
            ["method"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "ekd_batch_size",
            "Samples per teacher forward pass (the cache misses of one request).",
            ["teacher"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "ekd_inference_seconds",
            "Wall time of one teacher forward pass, as the backend runs it.",
            ["teacher"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.cache_hits = Counter(
            "ekd_cache_hits",
            "Output cache lookups (one per sample and output) answered from the cache.",
            ["teacher"],
            registry=self.registry,
        )
        self.cache_misses = Counter(
            "ekd_cache_misses",
            "Output cache lookups (one per sample and output) not answered.",
            ["teacher"],
            registry=self.registry,
        )
        self.cache_corrupt = Counter(
            "ekd_cache_corrupt",
            "Cache misses that were damaged values (deleted and recomputed).",
            ["teacher"],
            registry=self.registry,
        )
        self.cache_errors = Counter(
            "ekd_cache_errors",
            "Cache reads or writes that did not happen (failed, skipped while the cache was unavailable, or "
            "dropped over the pending-write bound); requests were served without them.",
            ["teacher", "operation"],
            registry=self.registry,
        )
        self.cache_skipped = Counter(
            "ekd_cache_skipped",
            "Cache reads or writes not tried because the cache had just failed (its circuit breaker was "
            "open); each cost microseconds. A subset of ekd_cache_errors.",
            ["teacher", "operation"],
            registry=self.registry,
        )
        self.cache_dropped_writes = Counter(
            "ekd_cache_dropped_writes",
            "Computed values not written to the cache because the pending background writes were at their "
            "bound (the cache is slower than the service).",
            ["teacher"],
            registry=self.registry,
        )
        self.unread_requests = Counter(
            "ekd_unread_requests",
            "Calls ended before their handler ran, by method and reason: 'timeout' (no request message "
            "within the read deadline), 'missing' (the call ended without one), 'undecodable'.",
            ["method", "reason"],
            registry=self.registry,
        )
        self.served_bytes = Counter(
            "ekd_served_bytes",
            "Serialized size of the InferResponse messages sent, per teacher.",
            ["teacher"],
            registry=self.registry,
        )


def start_metrics_server(
    metrics: Metrics, port: int, addr: str = "127.0.0.1"
) -> tuple[WSGIServer, threading.Thread]:
    """Serve `metrics` at http://addr:port/metrics from a daemon thread; port 0 picks a free one
    (`server.server_port`). Stop it with `server.shutdown()`."""
    return start_http_server(port, addr=addr, registry=metrics.registry)
