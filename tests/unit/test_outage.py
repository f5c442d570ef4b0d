"""`wait_out_outage`: asks again with backoff while the failure is an outage, within the budget, and says
so; any other error passes at once."""

from __future__ import annotations

import logging
import threading

import pytest

from trainer.runs.outage import OutageWait, wait_out_outage


class Outage(Exception):
    pass


def flaky(failures: list[Exception]):
    """A call that raises each of `failures` in turn, then returns "answer"; counts its calls."""
    calls = []

    def call() -> str:
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return "answer"

    return call, calls


def test_it_asks_again_until_answered_warning_each_attempt_and_once_back(caplog):
    call, calls = flaky([Outage("down"), Outage("still down")])
    with caplog.at_level(logging.WARNING, logger="trainer.runs.outage"):
        answer = wait_out_outage(
            OutageWait(5, max_backoff_seconds=0.05),
            Outage("first"),
            call,
            is_outage=lambda e: isinstance(e, Outage),
            what="cache",
        )
    assert answer == "answer" and len(calls) == 3
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "cache unreachable (first); waiting up to 5 s for it, 0 s so far (attempt 1 in 0.1 s)"
    assert lines[1].startswith("cache unreachable (down);") and lines[2].startswith(
        "cache unreachable (still"
    )
    assert lines[3].startswith("cache is back after 0 s (attempt 3)")


def test_past_the_budget_the_last_outage_is_raised_and_the_last_pause_fits_the_budget(caplog):
    call, calls = flaky([Outage(f"down {i}") for i in range(100)])
    with caplog.at_level(logging.WARNING, logger="trainer.runs.outage"), pytest.raises(Outage) as raised:
        wait_out_outage(
            OutageWait(0.3, max_backoff_seconds=10), Outage("first"), call, is_outage=lambda e: True, what="x"
        )
    assert str(raised.value) == "down 0" and len(calls) == 1  # one pause, cut from 1 s to the 0.3 s budget
    assert caplog.records[0].getMessage().endswith("(attempt 1 in 0.3 s)")


def test_another_error_passes_at_once_and_a_zero_budget_does_not_wait():
    call, _ = flaky([ValueError("a bug")])
    with pytest.raises(ValueError, match="a bug"):
        wait_out_outage(
            OutageWait(5, max_backoff_seconds=0.01),
            Outage("x"),
            call,
            is_outage=lambda e: isinstance(e, Outage),
            what="x",
        )
    call, calls = flaky([])
    with pytest.raises(Outage, match="first"):
        wait_out_outage(OutageWait(0, max_backoff_seconds=1), Outage("first"), call, is_outage=bool, what="x")
    assert not calls


def test_a_stop_ends_the_wait_with_the_outage():
    stop = threading.Event()
    stop.set()
    call, calls = flaky([])
    with pytest.raises(Outage, match="first"):
        wait_out_outage(
            OutageWait(60, max_backoff_seconds=30), Outage("first"), call, is_outage=bool, what="x", stop=stop
        )
    assert not calls
