"""`ekd cache export/import` on Ray: the bank's shards as a Ray Data job, one task per shard (the Ray adapter
of `trainer.bank.transfer`, whose functions read, check and write the shards)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import ray

from trainer.runs.ray_address import ray_init_address

Task = TypeVar("Task")
Done = TypeVar("Done")


class OverRayData:
    """A `transfer.MapShards` on the Ray cluster at `address` (None: a private local instance, never a
    cluster that happens to run on this machine)."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address

    def __call__(self, fn: Callable[[Task], Done], tasks: list[Task]) -> list[Done]:
        if not tasks:
            return []

        # Each task travels in its row (a shard's keys to the worker that exports them), not in the function.
        def run(row: dict[str, object]) -> dict[str, object]:
            return {"index": row["index"], "done": fn(row["task"])}  # type: ignore[arg-type]

        started_ray = not ray.is_initialized()
        if started_ray:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance needs no tokens
            ray.init(address=ray_init_address(self.address), include_dashboard=False, log_to_driver=False)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            rows = (
                ray.data.from_items([{"index": index, "task": task} for index, task in enumerate(tasks)])
                .repartition(len(tasks))
                .map(run)
                .take_all()
            )
        finally:
            if started_ray:
                ray.shutdown()
        return [row["done"] for row in sorted(rows, key=lambda row: row["index"])]
