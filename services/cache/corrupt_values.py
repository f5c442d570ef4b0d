"""Corrupt cache values, reported without flooding the log.

A store deletes every corrupt value it reads (`TeacherOutputStore.get_many`) and the service computes the
output again; a forged or damaged cache holds thousands of them, and a warning each would bury the rest of the
log. `corrupt_values`, one report per process, counts them by kind (damaged, forged, of the wrong kind) and
logs ONE line per `REPORT_INTERVAL_SECONDS`: the first value at once, the values found in the rest of an
interval when it ends, and what is still counted when the process exits.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import Counter

from services.formats.codec import CorruptValueError

logger = logging.getLogger(__name__)

REPORT_INTERVAL_SECONDS = 10.0
"""At most one log line about corrupt cache values per this many seconds."""

DAMAGED = "damaged"
FORGED = "forged"
WRONG_KIND = "of the wrong kind"


class ForgedValueError(CorruptValueError):
    """A value without a valid HMAC tag for its key: not written with the cache's secret."""


class WrongKindValueError(CorruptValueError):
    """An intact value of another dtype or shape than its key's: only a foreign or buggy writer leaves one."""


def kind_of(error: CorruptValueError) -> str:
    """The kind of a corrupt value, as the report counts it."""
    if isinstance(error, ForgedValueError):
        return FORGED
    if isinstance(error, WrongKindValueError):
        return WRONG_KIND
    return DAMAGED


class CorruptValueReport:
    """Counts of corrupt values by kind, logged as one warning line per `interval_seconds` at most."""

    def __init__(self, interval_seconds: float = REPORT_INTERVAL_SECONDS) -> None:
        self.interval_seconds = interval_seconds
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._example = ""
        self._reported_at = -float("inf")
        self._timer: threading.Timer | None = None

    def found(self, error: CorruptValueError) -> None:
        """Count one corrupt value (deleted by the store); report now when no line went out in the last
        interval, else when the interval ends."""
        with self._lock:
            self._counts[kind_of(error)] += 1
            self._example = self._example or str(error)
            if self._timer is not None:
                return
            due = self._reported_at + self.interval_seconds - time.monotonic()
            if due > 0:
                self._timer = threading.Timer(due, self.flush)
                self._timer.daemon = True
                self._timer.start()
                return
        self.flush()

    def flush(self) -> None:
        """Log what is counted and not yet reported, if anything."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            counts, example = self._counts, self._example
            self._counts, self._example = Counter(), ""
            if counts:
                self._reported_at = time.monotonic()
        if not counts:
            return
        total = counts.total()
        logger.warning(
            "deleted %d corrupt cache value%s (%s), to be computed again; first: %s; at most one such line "
            "every %g s",
            total,
            "" if total == 1 else "s",
            ", ".join(f"{count} {kind}" for kind, count in counts.most_common()),
            example,
            self.interval_seconds,
        )


corrupt_values = CorruptValueReport()
"""The process's report, which every store feeds."""
atexit.register(corrupt_values.flush)
