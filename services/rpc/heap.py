"""Handing the memory of large requests back to the kernel once the server is done with them.

A teacher server takes requests of tens of megabytes, many at once: gRPC receives each into its own buffers,
Python copies it into one bytes object, the forward passes allocate per slice. glibc's allocator keeps much of
what is freed in its arenas (one per thread that allocated), so after a burst of 24 requests of 60 MB the
server's resident memory stayed 600-800 MB above what it held before, for good. `HeapTrimmer` calls glibc's
`malloc_trim(0)` shortly after the last large request of a burst ends, which returns the free pages of every
arena. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from collections.abc import Callable

LARGE_REQUEST_BYTES = 1 << 20
"""Requests from this size up are worth trimming after: smaller ones live in memory the allocator reuses."""

TRIM_DELAY_SECONDS = 1.0
"""How long after the last large request ends the trim runs: a burst's requests end close together, and one
trim after them does the work of many."""


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class HeapTrimmer:
    """`released(nbytes)` from the event loop whenever a request of `nbytes` is let go of; a trim runs, in a
    worker thread (ctypes releases the GIL), TRIM_DELAY_SECONDS after the last large one."""

    def __init__(self) -> None:
        self._trim = _malloc_trim()
        self._pending: asyncio.TimerHandle | None = None

    def released(self, nbytes: int) -> None:
        if self._trim is None or nbytes < LARGE_REQUEST_BYTES:
            return
        if self._pending is not None:
            self._pending.cancel()
        self._pending = asyncio.get_running_loop().call_later(TRIM_DELAY_SECONDS, self._start)

    def _start(self) -> None:
        self._pending = None
        if self._trim is not None:  # always: only scheduled when there is one
            asyncio.get_running_loop().run_in_executor(None, self._trim, 0)
