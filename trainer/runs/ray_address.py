"""Which Ray a command joins: the one way ekd's commands choose it, and find it answering."""

from __future__ import annotations

import os
import socket

from services.core.errors import UserError
from trainer.runs.outage import OutageWait, wait_out_outage

# How long a command waits for the cluster it is told to join to accept a connection (a head restarting, as a
# KubeRay head pod does, takes seconds to a minute). Ray's own connect would retry without end.
RAY_CLUSTER_WAIT = OutageWait(budget_seconds=60.0, max_backoff_seconds=10.0)
# One attempt to connect to the cluster's port.
CONNECT_TIMEOUT_SECONDS = 5.0


def ray_init_address(address: str | None) -> str:
    """`address` when given; else the cluster RAY_ADDRESS names (a Ray job's driver, a KubeRay pod); else a
    private local instance. Never Ray's own default of joining whatever Ray runs on this machine, which would
    put a run on another user's (or another test's) instance. A cluster's address (`host:port`, or Ray
    Client's `ray://host:port`) is returned once its port accepts a connection, waited for within
    RAY_CLUSTER_WAIT; past it, a UserError names the address and where it came from."""
    chosen = address or os.environ.get("RAY_ADDRESS") or "local"
    endpoint = _host_and_port(chosen)
    if endpoint is not None:
        _wait_for_cluster(chosen if address else f"{chosen} (RAY_ADDRESS)", *endpoint)
    return chosen


def _host_and_port(address: str) -> tuple[str, int] | None:
    """Where a cluster's address points; None for Ray's own words (`local`, `auto`) and other schemes."""
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not host or not port.isdigit() or "://" in host:
        return None
    return host.strip("[]"), int(port)


def _wait_for_cluster(named: str, host: str, port: int) -> None:
    def connect() -> None:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_SECONDS).close()

    try:
        connect()
    except OSError as refused:
        try:
            wait_out_outage(
                RAY_CLUSTER_WAIT,
                refused,
                connect,
                is_outage=lambda error: isinstance(error, OSError),
                what=f"Ray cluster at {named}",
                reason=lambda error: getattr(error, "strerror", None) or type(error).__name__,
            )
        except OSError as last:
            raise UserError(
                f"no Ray cluster answers at {named}: nothing accepted a connection on {host}:{port} within "
                f"{RAY_CLUSTER_WAIT.budget_seconds:.0f} s ({last.strerror or type(last).__name__}); start "
                "it (`ray start --head`) or give the address of one that runs"
            ) from last
