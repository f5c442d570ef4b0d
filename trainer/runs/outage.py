"""Waiting out an outage of something a run depends on (the teacher service, the cache `ekd warm` fills):
ask again after 1 s, 2 s, 4 s, ... (at most `OutageWait.max_backoff_seconds` apart, the last pause cut to
what is left) for up to `OutageWait.budget_seconds` from the first failure, with a warning before each
attempt and one when it answers again. Plain Python: the served teacher source and the bank writer share it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from trainer.config import TeacherSourceConfig

logger = logging.getLogger(__name__)

_Result = TypeVar("_Result")

# The first pause of a wait; each next one doubles, up to OutageWait.max_backoff_seconds.
FIRST_PAUSE_SECONDS = 1.0


@dataclass(frozen=True)
class OutageWait:
    """How long to wait for something that does not answer: in all, per outage (`budget_seconds`, 0: not at
    all), and at most between two attempts (`max_backoff_seconds`); teacher_source's `outage_wait_seconds`
    and `outage_backoff_max_seconds`."""

    budget_seconds: float
    max_backoff_seconds: float

    @classmethod
    def of(cls, settings: TeacherSourceConfig) -> OutageWait:
        """The wait `settings` ask for (TeacherSourceConfig() for the defaults)."""
        return cls(settings.outage_wait_seconds, settings.outage_backoff_max_seconds)


def wait_out_outage(
    wait: OutageWait,
    error: Exception,
    again: Callable[[], _Result],
    *,
    is_outage: Callable[[Exception], bool],
    what: str,
    reason: Callable[[Exception], str] = str,
    stop: threading.Event | None = None,
) -> _Result:
    """`again()` once it no longer fails with an outage (`is_outage`), after `error` began one; `what` names
    the thing waited for in the warnings, `reason` an error's short form. Raises the last outage error once
    the budget is spent (the caller names the budget), that error at once when `stop` is set, and any other
    error as it comes."""
    started = time.monotonic()
    attempt = 0
    while (waited := time.monotonic() - started) < wait.budget_seconds:
        attempt += 1
        pause = min(
            FIRST_PAUSE_SECONDS * 2 ** (attempt - 1), wait.max_backoff_seconds, wait.budget_seconds - waited
        )
        logger.warning(
            "%s unreachable (%s); waiting up to %.0f s for it, %.0f s so far (attempt %d in %.1f s)",
            what,
            reason(error),
            wait.budget_seconds,
            waited,
            attempt,
            pause,
        )
        if stop is None:
            time.sleep(pause)
        elif stop.wait(pause):
            raise error
        try:
            result = again()
        except Exception as still:
            if not is_outage(still):
                raise
            error = still
            continue
        logger.warning("%s is back after %.0f s (attempt %d)", what, time.monotonic() - started, attempt)
        return result
    raise error
