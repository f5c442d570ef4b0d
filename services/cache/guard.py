"""Degrade, never die: the cache as seen by callers that can do without it (the client, the servicer).

`GuardedStore` wraps a store with a circuit breaker. The first call that fails (a CacheError: the backend
refused, or a short socket timeout ran out) opens it and logs ONE warning; while it is open, calls do not
touch the backend and answer at once (a read: every key a miss; a write: dropped), costing microseconds.
After `cooldown_seconds`, the next call starts ONE probe (a ping) in a thread of its own, so that no caller
ever waits on a frozen backend; the probe closes the breaker when the backend answers (one info line), or
keeps it open for another cooldown. A full cache (CacheFullError) only drops that write: it still answers
reads, so it does not open the breaker, and says so at most once per cooldown.

Other exceptions are bugs, not outages: they propagate with their tracebacks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum

from services.cache.layout import CachedValue, ValueSpec
from services.cache.store import CacheError, CacheFullError, TeacherOutputStore

logger = logging.getLogger(__name__)

DEFAULT_COOLDOWN_SECONDS = 5.0


class Outcome(Enum):
    """What became of one guarded call."""

    DONE = "done"
    """The backend answered."""
    FAILED = "failed"
    """The backend failed (an error or a timeout); the call was answered without it."""
    SKIPPED = "skipped"
    """Not tried: the breaker was open (or the cache full, for a write)."""


@dataclass(frozen=True)
class Lookup:
    """A guarded read: `values` as `TeacherOutputStore.get_many` gives them (every one None unless DONE) and
    how many of the values read were corrupt (damaged, forged or of the wrong kind: deleted, read as None)."""

    values: list[CachedValue | None]
    outcome: Outcome
    corrupt: int = 0


@dataclass(frozen=True)
class GuardStats:
    """Counts since the guard was made: `failures` are calls (probes included) that the backend failed,
    `skipped` calls answered without trying it while the breaker was open, `outages` the times the cache went
    away (the breaker opened). Hits, misses and corrupt values are the wrapped store's `stats`."""

    failures: int = 0
    skipped: int = 0
    outages: int = 0


class GuardedStore:
    """`store` behind a circuit breaker (see the module doc); `store` stays the caller's to close."""

    def __init__(
        self, store: TeacherOutputStore, *, cooldown_seconds: float = DEFAULT_COOLDOWN_SECONDS
    ) -> None:
        if isinstance(store, GuardedStore):
            raise TypeError("the store is already guarded; use guarded(store) to guard it at most once")
        if not cooldown_seconds > 0:
            raise ValueError(f"cooldown_seconds must be positive; got {cooldown_seconds!r}")
        self.store = store
        self.cooldown_seconds = cooldown_seconds
        self._lock = threading.Lock()
        self._opened_at: float | None = None  # None: closed
        self._probing = False
        self._full_warned_at: float | None = None
        self._stats = GuardStats()

    @property
    def available(self) -> bool:
        """Whether calls go to the backend now (the breaker is closed)."""
        with self._lock:
            return self._opened_at is None

    @property
    def stats(self) -> GuardStats:
        with self._lock:
            return self._stats

    def get_many(self, keys: Sequence[bytes], expected: Sequence[ValueSpec] | None = None) -> Lookup:
        """`TeacherOutputStore.get_many` of the wrapped store, or all misses when it fails or is skipped."""
        keys = list(keys)
        if not self._may_call():
            return Lookup([None] * len(keys), Outcome.SKIPPED)
        try:
            values, corrupt = self.store._lookup(keys, expected)
        except CacheError as error:
            self._failed(error)
            return Lookup([None] * len(keys), Outcome.FAILED)
        return Lookup(values, Outcome.DONE, corrupt)

    def put_many(self, items: Sequence[tuple[bytes, CachedValue]]) -> Outcome:
        """`TeacherOutputStore.put_many` of the wrapped store; a write it cannot take is dropped."""
        if not self._may_call():
            return Outcome.SKIPPED
        try:
            self.store.put_many(items)
        except CacheFullError as error:
            self._full(error)
            return Outcome.FAILED
        except CacheError as error:
            self._failed(error)
            return Outcome.FAILED
        return Outcome.DONE

    # --- the breaker ------------------------------------------------------------------------------------

    def _may_call(self) -> bool:
        """True when closed; when open, count a skip and start the probe once the cooldown has passed."""
        with self._lock:
            if self._opened_at is None:
                return True
            self._stats = replace(self._stats, skipped=self._stats.skipped + 1)
            if self._probing or time.monotonic() - self._opened_at < self.cooldown_seconds:
                return False
            self._probing = True
        threading.Thread(target=self._probe, name="ekd-cache-probe", daemon=True).start()
        return False

    def _failed(self, error: BaseException) -> None:
        with self._lock:
            went_away = self._opened_at is None
            self._opened_at = time.monotonic()
            self._stats = replace(
                self._stats, failures=self._stats.failures + 1, outages=self._stats.outages + went_away
            )
        if went_away:
            logger.warning(
                "the output cache is unavailable, serving without it (probed again every %g s): %s",
                self.cooldown_seconds,
                error,
                exc_info=not isinstance(error, CacheError),
            )

    def _full(self, error: CacheFullError) -> None:
        now = time.monotonic()
        with self._lock:
            self._stats = replace(self._stats, failures=self._stats.failures + 1)
            warn = self._full_warned_at is None or now - self._full_warned_at >= self.cooldown_seconds
            if warn:
                self._full_warned_at = now
        if warn:
            logger.warning("the output cache refused a write, which is dropped: %s", error)

    def _probe(self) -> None:
        try:
            self.store.ping()
        except Exception as error:  # whatever the ping raised, the backend is not back; a bug is logged
            with self._lock:
                self._opened_at = time.monotonic()
                self._probing = False
                self._stats = replace(self._stats, failures=self._stats.failures + 1)
            if not isinstance(error, CacheError):
                logger.exception("probing the output cache failed")
            return
        with self._lock:
            self._opened_at = None
            self._probing = False
        logger.info("the output cache is back; reading and writing it again")


def guarded(store: TeacherOutputStore | GuardedStore, **options) -> GuardedStore:
    """`store` itself when already guarded, else a `GuardedStore` of it (`options` go to its constructor)."""
    return store if isinstance(store, GuardedStore) else GuardedStore(store, **options)
