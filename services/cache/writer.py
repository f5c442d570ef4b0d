"""Cache writes that hold up nobody: `BackgroundWriter` writes to a guarded store from a thread of its own.

The servicer hands it a request's computed values and answers at once. Pending writes are bounded in values
and bytes: beyond either bound a batch is dropped (and reported), so a slow or frozen cache costs memory up to
the bounds, never a response's time. Batches waiting together go out in one `put_many` (one LMDB transaction,
one Redis pipeline). `wait` blocks until everything handed over has been written or given up: for a graceful
stop, and for tests that read the cache right after a request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from services.cache.guard import GuardedStore, Outcome
from services.cache.layout import CachedValue
from services.formats.soft_labels import CompactLogits, frame_bytes

logger = logging.getLogger(__name__)

DEFAULT_MAX_PENDING_BYTES = 256 * 2**20
DEFAULT_MAX_PENDING_VALUES = 2**16

WriteCallback = Callable[[str, Outcome, int], None]
"""Called from the writer's thread with each batch's label, what became of it and its number of values."""


@dataclass
class _Batch:
    label: str
    items: Sequence[tuple[bytes, CachedValue]]
    size: int


def value_bytes(value: CachedValue) -> int:
    """Memory a value holds while it waits: its elements (a compact row: its frame's size)."""
    if isinstance(value, CompactLogits):
        return frame_bytes(value.num_classes, value.entries)
    return value.numel() * value.element_size()


class BackgroundWriter:
    """Writes batches to `store` from one daemon thread (started with the first batch), holding at most
    `max_pending_values` values and `max_pending_bytes` bytes; `on_written` hears of each batch's fate."""

    def __init__(
        self,
        store: GuardedStore,
        *,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        max_pending_values: int = DEFAULT_MAX_PENDING_VALUES,
        on_written: WriteCallback | None = None,
    ) -> None:
        if max_pending_bytes < 1 or max_pending_values < 1:
            raise ValueError(
                f"max_pending_bytes and max_pending_values must be positive; got {max_pending_bytes} and "
                f"{max_pending_values}"
            )
        self.store = store
        self.max_pending_bytes = max_pending_bytes
        self.max_pending_values = max_pending_values
        self._on_written = on_written
        self._changed = threading.Condition()
        self._queue: list[_Batch] = []
        self._pending_bytes = 0
        self._pending_values = 0  # queued and being written
        self._thread: threading.Thread | None = None

    def submit(self, label: str, items: Sequence[tuple[bytes, CachedValue]]) -> bool:
        """Queue a batch of (key, value) and return at once: True when queued, False when it was dropped
        because the pending writes would exceed a bound."""
        if not items:
            return True
        size = sum(value_bytes(value) for _, value in items)
        with self._changed:
            if (
                self._pending_bytes + size > self.max_pending_bytes
                or self._pending_values + len(items) > self.max_pending_values
            ):
                return False
            self._queue.append(_Batch(label, items, size))
            self._pending_bytes += size
            self._pending_values += len(items)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ekd-cache-writer", daemon=True)
                self._thread.start()
            self._changed.notify_all()
        return True

    def wait(self, timeout_seconds: float) -> bool:
        """Block until every batch submitted so far is written or given up; False if `timeout_seconds`
        passed first."""
        deadline = time.monotonic() + timeout_seconds
        with self._changed:
            while self._pending_values:
                left = deadline - time.monotonic()
                if left <= 0 or not self._changed.wait(left):
                    return self._pending_values == 0
        return True

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._queue:
                    self._changed.wait()
                batches, self._queue = self._queue, []
            try:
                self._write(batches)
            except Exception:  # a bug in a value, a key or a callback must not end the writer: log it
                logger.exception("writing %d batches to the output cache failed", len(batches))
            finally:
                with self._changed:
                    self._pending_bytes -= sum(batch.size for batch in batches)
                    self._pending_values -= sum(len(batch.items) for batch in batches)
                    self._changed.notify_all()

    def _write(self, batches: list[_Batch]) -> None:
        outcome = self.store.put_many([item for batch in batches for item in batch.items])
        if self._on_written is not None:
            for batch in batches:
                self._on_written(batch.label, outcome, len(batch.items))
