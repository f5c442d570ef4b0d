"""Teacher outputs fetched ahead, so the student does not wait for them.

A bounded background thread walks the epoch's batches and fetches each batch's teacher outputs while the
student trains on an earlier one; the queue between them holds at most `depth` batches. The thread submits up
to the source's `batches_in_flight` batches before it waits for the oldest, so that a served source keeps
that many requests at the service (which batches and computes them) while their answers stream back.
A thread rather than Ray Data's streaming pipeline: what to fetch depends on the method (and, for FEED
sequential, on the stage), the fetch itself is cache reads and gRPC calls that release the GIL, and the core
stays free of Ray.
The time the training thread waits on the queue is the student's stall time.

A batch whose teacher service stops answering is asked for again by the source (trainer.runs.sources) until
the service is back, so the batches come out complete and in order whatever happens on the way; when the
training thread stops early, a wait in the fetching thread ends at once.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from services.cache import FULL
from trainer.methods.base import TeacherOutputs
from trainer.runs.sources import TeacherSource

_PUT_POLL_SECONDS = 0.1


@dataclass
class PreparedBatch:
    images: torch.Tensor  # uint8 [B, C, H, W]
    labels: torch.Tensor
    teachers: TeacherOutputs | None
    stall_seconds: float  # how long the training thread waited for this batch's teacher outputs


class _EndOfEpoch:
    pass


def prepared_batches(
    batches: Iterable,
    source: TeacherSource | None,
    wanted: Sequence[Sequence[str]],
    depth: int,
    logits_form: str = FULL,
) -> Generator[PreparedBatch, None, None]:
    """(images, labels, ...) batches with their teacher outputs; fetched `depth` batches ahead when
    depth > 0. A generator: closing it stops the fetching thread."""
    if source is None or not any(wanted):  # nothing to fetch
        for images, labels, *_ in batches:
            yield PreparedBatch(images, labels, None, 0.0)
        return
    if depth == 0:
        for images, labels, *_ in batches:
            start = time.perf_counter()
            outputs = source.fetch(images, wanted, logits_form=logits_form)
            yield PreparedBatch(images, labels, outputs, time.perf_counter() - start)
        return
    yield from _prefetched(batches, source, wanted, depth, logits_form)


def _prefetched(
    batches: Iterable, source: TeacherSource, wanted: Sequence[Sequence[str]], depth: int, logits_form: str
) -> Iterator[PreparedBatch]:
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=_PUT_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            submitted: deque = deque()
            for images, labels, *_ in batches:
                submitted.append(
                    (images, labels, source.submit(images, wanted, stop=stop, logits_form=logits_form))
                )
                if len(submitted) >= source.batches_in_flight:
                    images, labels, outputs = submitted.popleft()
                    if not put((images, labels, outputs())):
                        return
            while submitted:
                images, labels, outputs = submitted.popleft()
                if not put((images, labels, outputs())):
                    return
            put(_EndOfEpoch())
        except BaseException as err:  # handed to the training thread, which re-raises it
            put(err)

    worker = threading.Thread(target=produce, name="ekd-teacher-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            start = time.perf_counter()
            item = ready.get()
            waited = time.perf_counter() - start
            if isinstance(item, _EndOfEpoch):
                return
            if isinstance(item, BaseException):
                raise item
            images, labels, outputs = item
            yield PreparedBatch(images, labels, outputs, waited)
    finally:
        stop.set()
        worker.join()
