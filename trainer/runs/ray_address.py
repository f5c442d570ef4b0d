"""Which Ray a command joins: the one way ekd's commands choose it."""

from __future__ import annotations

import os


def ray_init_address(address: str | None) -> str:
    """`address` when given; else the cluster RAY_ADDRESS names (a Ray job's driver, a KubeRay pod); else a
    private local instance. Never Ray's own default of joining whatever Ray runs on this machine, which would
    put a run on another user's (or another test's) instance."""
    return address or os.environ.get("RAY_ADDRESS") or "local"
