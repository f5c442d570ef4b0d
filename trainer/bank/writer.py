"""Writing one teacher's outputs for batches of views into the output cache, under exactly the keys the
teacher service writes (services/rpc/servicer.py) and the client reads: plain PyTorch, the worker of `ekd
warm`.

For each view: the input digest of its uint8 bytes, then per requested output `output_key(identity, output,
dtype, 0, digest)` holding the output in `dtype` (the served path's default, float16), except the logits in
the compact form, `output_key(..., form="compact")` holding its `services.formats.soft_labels` frame. A view
whose outputs are all cached is skipped, so a rerun resumes where the last one stopped; the rest are computed
in one forward and written in one `put_many` (one LMDB transaction, or one Redis pipeline of whole-value
SETs): an interrupted batch leaves whole values or none.

The cache is where the work goes, so a cache that does not answer (Redis restarting, frozen, or too slow
for its socket timeout on a loaded machine) is waited for, not skipped: each read or write is asked again
as `trainer.runs.outage` waits (teacher_source's `outage_wait_seconds`, a warning per attempt), and only
then is the batch an error. Reads and writes are idempotent, so asking again loses nothing and computes
nothing twice. A writer that gave up fails every later batch at once: its job is ending, and batches queued
behind it must not each wait again."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from services.cache import (
    COMPACT,
    FULL,
    CachedValue,
    CacheUnreachableError,
    OutputEntries,
    TeacherOutputStore,
    input_digests,
    open_store,
)
from services.core.contract import DEFAULT_OUTPUT_DTYPE, LOGITS
from services.formats.codec import DTYPES
from services.formats.soft_labels import compress
from services.teachers.engine import TeacherEngine
from services.teachers.zoo import create_teacher
from trainer.config import ExperimentConfig
from trainer.methods import create_method
from trainer.methods.base import TeacherInfo
from trainer.runs.outage import OutageWait, wait_out_outage

_Result = TypeVar("_Result")


def bank_entries(
    identity: str, outputs: Sequence[str], form: str, dtype: str = DEFAULT_OUTPUT_DTYPE
) -> dict[str, OutputEntries]:
    """Per output, the bank's entries of teacher `identity`: the logits in `form`, feature maps in full."""
    return {output: OutputEntries.of(identity, output, dtype, logits_form=form) for output in outputs}


def requested_outputs(
    cfg: ExperimentConfig, num_classes: int, in_chans: int, image_size: int
) -> list[list[str]]:
    """Per teacher, the outputs the experiment's method asks for (its logits, and any feature taps)."""
    teachers = [create_teacher(t.name, num_classes, checkpoint=t.checkpoint) for t in cfg.teachers]
    infos = [
        TeacherInfo(t.spec.name, t.spec.num_classes, TeacherEngine(t).feature_shapes(image_size))
        for t in teachers
    ]
    method = create_method(cfg.method, num_classes=num_classes, in_chans=in_chans, teachers=infos)
    return method.teacher_outputs()


def waiting_out_cache_outages(wait: OutageWait, call: Callable[[], _Result]) -> _Result:
    """`call()`, asked again while the cache is unreachable, within `wait`; past it, a CacheUnreachableError
    naming the setting."""
    try:
        return call()
    except CacheUnreachableError as error:
        try:
            return wait_out_outage(
                wait,
                error,
                call,
                is_outage=lambda failed: isinstance(failed, CacheUnreachableError),
                what="cache",
            )
        except CacheUnreachableError as last:
            raise CacheUnreachableError(
                f"the cache stayed unreachable beyond teacher_source.outage_wait_seconds "
                f"({wait.budget_seconds:g} s); last error: {last}"
            ) from None


@dataclass(frozen=True)
class BatchWritten:
    views: int
    cached: int  # views already in the cache, skipped
    bytes_written: int
    seconds: float  # spent computing and writing


class TeacherBankWriter:
    """Fills the cache at `cache_uri` with `engine`'s `outputs` for the views it is given, in `form` ("full"
    or "compact"). The cache is opened on the first batch, through the outage wait like every call to it: a
    writer made while the cache is away (a restarted actor) waits for it rather than fails."""

    def __init__(
        self,
        engine: TeacherEngine,
        cache_uri: str,
        outputs: Sequence[str],
        form: str,
        outage_wait: OutageWait,
        dtype: str = DEFAULT_OUTPUT_DTYPE,
    ) -> None:
        if engine.spec.weights_sha256 is None:
            raise ValueError(
                f"teacher {engine.spec.name!r} has no weights file, so its identity does not pin its weights "
                "and its outputs are never cached"
            )
        self.engine = engine
        self.cache_uri = cache_uri
        self.store: TeacherOutputStore | None = None  # opened by the first call
        self.outputs = list(outputs)
        self.form = form
        self.dtype = dtype
        self.outage_wait = outage_wait
        self.outage_error: str | None = None  # why the last wait ended without the cache

    def _call_store(self, call: Callable[[TeacherOutputStore], _Result]) -> _Result:
        """`call(store)`, the store opened first if need be, waiting out the cache's outages; once a wait has
        ended without the cache, every later call fails at once."""
        if self.outage_error is not None:
            raise CacheUnreachableError(self.outage_error)

        def attempt() -> _Result:
            if self.store is None:
                self.store = open_store(self.cache_uri)
            return call(self.store)

        try:
            return waiting_out_cache_outages(self.outage_wait, attempt)
        except CacheUnreachableError as error:
            self.outage_error = str(error)
            raise

    def write(self, views: torch.Tensor, *, evaluation: bool = False) -> BatchWritten:
        """Compute and store the outputs of the views [B, C, H, W] (uint8) not yet cached; `evaluation`
        images get what a run's teacher evaluation asks for instead: full logits."""
        started = time.perf_counter()
        outputs, form = ([LOGITS], FULL) if evaluation else (self.outputs, self.form)
        digests = input_digests(views)
        entries = bank_entries(self.engine.spec.identity, outputs, form, self.dtype)
        keys = {output: entries[output].keys(digests) for output in outputs}
        found = self._call_store(
            lambda store: store.get_many([key for output in outputs for key in keys[output]])
        )
        assert self.store is not None  # opened by the call above
        batch = views.shape[0]
        missing = [
            i
            for i in range(batch)
            if any(found[column * batch + i] is None for column in range(len(outputs)))
        ]
        before = self.store.stats.bytes_written
        if missing:
            computed = self.engine.infer(views[missing], outputs)
            items: list[tuple[bytes, CachedValue]] = []
            for output in outputs:
                values = computed[output]
                if entries[output].form == COMPACT:
                    compact = compress(values)
                    items += [(keys[output][i], compact[row]) for row, i in enumerate(missing)]
                else:
                    # A quantized value is taken from the float32 logits, as a run in process takes it.
                    if entries[output].form == FULL:
                        values = values.to(DTYPES[self.dtype])
                    items += [(keys[output][i], values[row]) for row, i in enumerate(missing)]
            self._call_store(lambda store: store.put_many(items))
        return BatchWritten(
            views=batch,
            cached=batch - len(missing),
            bytes_written=self.store.stats.bytes_written - before,
            seconds=time.perf_counter() - started,
        )
