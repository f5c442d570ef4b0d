"""Throughput timing for the benchmarks: units per second of a callable that says how many units it did."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

Work = Callable[[], int]  # does some work and returns how many units (bytes, images, values) it did


def _window_rate(fn: Work, seconds: float) -> float:
    """Units per second of `fn` called repeatedly for `seconds` (at least once)."""
    done, start = 0, time.perf_counter()
    while True:
        done += fn()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def rate(fn: Work, seconds: float) -> float:
    """Units per second of `fn` over `seconds`, after one warm-up call."""
    fn()
    return _window_rate(fn, seconds)


def interleaved_rates(fns: Mapping[str, Work], seconds: float, rounds: int) -> dict[str, float]:
    """Units per second of each of `fns`, measured side by side: after one warm-up call each, `rounds` rounds
    that give every fn `seconds / rounds` in turn; each fn's figure is its fastest round. Interleaving spreads
    the load of a shared machine over all of them, and the fastest round is the least disturbed one."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, 0.0)
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = max(best[name], _window_rate(fn, seconds / rounds))
    return best
