"""Where a method's teacher outputs come from: one interface, chosen by the experiment's
`teacher_source.kind`.

`InProcessTeacherSource` runs the teachers in the training process (the way torchdistill does): the baseline
that the served path is measured against.

`ServedTeacherSource` reads the cache and asks the teacher service. When a service it has reached stops
answering (`TeacherServiceUnavailable`: down, restarting, redeployed; or CANCELLED: shutting down), it waits
for it: it asks again for the same images after 1 s, 2 s, 4 s, ... (at most `OutageWait.max_backoff_seconds`
apart) for up to `OutageWait.budget_seconds` (`trainer.runs.outage`), saying so in a warning per attempt and
once more when the service is back, then returns that batch's outputs as if nothing happened, so the training
loop neither skips nor repeats a sample. Beyond the budget the error is one line naming the address and the
budget. The outages and the time spent waiting are counted (`service_outages`, `outage_wait_seconds`). A
service not up yet when the source is made (a trainer started beside it) is waited for in the same way.

`BankTeacherSource` reads a bank that `ekd warm` filled, with no service: the same keys, the same values.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

import grpc
import torch

from services.cache import (
    COMPACT,
    FULL,
    CachedValue,
    CacheUnreachableError,
    OutputEntries,
    TeacherOutputStore,
    ValueSpec,
    input_digests,
    open_store,
)
from services.core.contract import DEFAULT_OUTPUT_DTYPE, LOGITS
from services.core.errors import ConfigError, UserError
from services.core.redaction import redact
from services.formats.codec import DTYPES
from services.formats.soft_labels import CompactLogits, compress
from services.rpc.client import TeacherClient, TeacherServiceError, TeacherServiceUnavailable
from services.teachers.engine import TeacherEngine
from services.teachers.spec import Teacher
from services.teachers.zoo import create_teacher
from trainer.config import ExperimentConfig, TeacherSourceConfig
from trainer.methods.base import TeacherInfo, TeacherOutputs
from trainer.runs.outage import OutageWait, wait_out_outage

logger = logging.getLogger(__name__)

_Result = TypeVar("_Result")


class TeacherSource(ABC):
    """Teacher outputs for batches of uint8 images, teachers in the experiment's order."""

    @abstractmethod
    def describe(self, image_size: int) -> list[TeacherInfo]:
        """What methods may know before training: classes and tap shapes for images of `image_size`."""

    # How many batches `submit` may have outstanding for the service to work on while earlier ones are read.
    batches_in_flight = 1

    @abstractmethod
    def fetch(
        self, images: torch.Tensor, wanted: Sequence[Sequence[str]], *, logits_form: str = FULL
    ) -> TeacherOutputs:
        """Outputs for uint8 images [B, C, H, W]; `wanted[i]` names teacher i's outputs ([] skips it).
        `logits_form` COMPACT lets the logits come as `CompactLogits` (the served source asks the cache and
        the service for the compact form, 64 bytes a view); dense logits are fine too, the training loop
        compresses them (`trainer.methods.base.in_soft_label_form`)."""

    def submit(
        self,
        images: torch.Tensor,
        wanted: Sequence[Sequence[str]],
        *,
        stop: threading.Event | None = None,
        logits_form: str = FULL,
    ) -> Callable[[], TeacherOutputs]:
        """`fetch`, started: call the returned function for its outputs. Here it runs at once; a source that
        can overlap work (the served one) returns before its outputs are in. A wait for an unreachable
        service that the returned function gets into ends, with that error, as soon as `stop` is set (for a
        fetching thread whose consumer is gone)."""
        outputs = self.fetch(images, wanted, logits_form=logits_form)
        return lambda: outputs

    @abstractmethod
    def parameter_counts(self) -> list[int]:
        """Parameters of each teacher, for the results table."""

    @abstractmethod
    def counters(self) -> dict[str, float]:
        """Running totals for the run summary (teacher calls; cache hits and misses where there is a
        cache; service outages waited out), ints except for the seconds counted."""

    def close(self) -> None:  # noqa: B027 (optional: most sources hold nothing to release)
        """Release what the source holds (connections, devices)."""


class InProcessTeacherSource(TeacherSource):
    def __init__(self, teachers: Sequence[Teacher], device: str | torch.device = "cpu") -> None:
        self.engines = [TeacherEngine(t, device) for t in teachers]
        self.calls = 0  # teacher forward passes for fetches (not those of `describe`)

    def describe(self, image_size: int) -> list[TeacherInfo]:
        return [
            TeacherInfo(
                name=e.spec.name, num_classes=e.spec.num_classes, feature_shapes=e.feature_shapes(image_size)
            )
            for e in self.engines
        ]

    def fetch(
        self, images: torch.Tensor, wanted: Sequence[Sequence[str]], *, logits_form: str = FULL
    ) -> TeacherOutputs:
        logits: list[torch.Tensor | CompactLogits | None] = []
        features: list[dict[str, torch.Tensor]] = []
        for engine, outputs in zip(self.engines, wanted, strict=True):
            result = {}
            if outputs:
                result = engine.infer(images, list(outputs))
                self.calls += 1
            logits.append(result.get(LOGITS))
            features.append({k: v for k, v in result.items() if k != LOGITS})
        return TeacherOutputs(logits=logits, features=features)

    def parameter_counts(self) -> list[int]:
        return [sum(p.numel() for p in e.model.parameters()) for e in self.engines]

    def counters(self) -> dict[str, float]:
        return {"teacher_calls": self.calls}


class ServedTeacherSource(TeacherSource):
    """Teacher outputs from the shared cache first and the teacher service for the misses (`TeacherClient`).

    `teachers[i]` is teacher i's name on the service. When `expected_identities[i]` is given (the identity of
    a local checkpoint of the same teacher), the service must host exactly that teacher: same architecture,
    weights and preprocessing; a mismatch is an error, not silently different targets. `max_in_flight` is how
    many Infer requests the client keeps outstanding, and how many batches `submit` lets run ahead.
    `outage_wait` is how long the source waits for the service when it does not answer (see the module
    docstring), when it is made and on every fetch; None: teacher_source's defaults.

    One thread at a time may fetch (the client's rule): the prefetching thread during an epoch, the training
    thread between epochs.
    """

    def __init__(
        self,
        address: str,
        teachers: Sequence[str],
        *,
        cache_uri: str | None = None,
        expected_identities: Sequence[str | None] | None = None,
        timeout_seconds: float = 120.0,
        max_in_flight: int = 1,
        outage_wait: OutageWait | None = None,
    ) -> None:
        self.names = list(teachers)
        self.shown_address = redact(address)
        self.outage_wait = outage_wait or OutageWait.of(TeacherSourceConfig())
        self.outages = 0
        self.outage_seconds = 0.0
        # When the service last came back after an outage: a fetch submitted before then that failed was
        # caught in that outage, and is asked again at once rather than waited for as a new outage.
        self._back_at = -float("inf")
        self.store = _open_cache(cache_uri) if cache_uri else None
        self.client = TeacherClient(
            address, store=self.store, timeout_seconds=timeout_seconds, max_in_flight=max_in_flight
        )
        self.batches_in_flight = max_in_flight
        try:
            hosted = self.client.teachers()
        except TeacherServiceError as error:
            if not _is_outage(error):
                raise
            hosted = self._wait_for_service(error, self.client.teachers, stop=None)
        for i, name in enumerate(self.names):
            if name not in hosted:
                raise ConfigError(
                    f"the teacher service at {self.shown_address} hosts no teacher {name!r}; it hosts: "
                    f"{', '.join(sorted(hosted))}"
                )
            expected = (expected_identities or [None] * len(self.names))[i]
            if expected is not None and hosted[name].identity != expected:
                raise ConfigError(
                    f"the teacher service's {name!r} is not the local checkpoint's teacher (identity "
                    f"{hosted[name].identity[:12]}… ≠ {expected[:12]}…): other weights or "
                    "preprocessing; point the experiment at the checkpoint the service loaded"
                )
        self.descriptions = [hosted[n] for n in self.names]

    def describe(self, image_size: int) -> list[TeacherInfo]:
        # The service resizes every image to the teacher's input size: tap shapes do not depend on image_size.
        return [
            TeacherInfo(name=d.name, num_classes=d.num_classes, feature_shapes=dict(d.taps))
            for d in self.descriptions
        ]

    def fetch(
        self, images: torch.Tensor, wanted: Sequence[Sequence[str]], *, logits_form: str = FULL
    ) -> TeacherOutputs:
        return self.submit(images, wanted, logits_form=logits_form)()

    def submit(
        self,
        images: torch.Tensor,
        wanted: Sequence[Sequence[str]],
        *,
        stop: threading.Event | None = None,
        logits_form: str = FULL,
    ) -> Callable[[], TeacherOutputs]:
        asked = {name: list(outputs) for name, outputs in zip(self.names, wanted, strict=True) if outputs}
        if not asked:
            return lambda: self._outputs({}, wanted)
        submitted_at = time.monotonic()

        def again() -> dict[str, dict[str, torch.Tensor | CompactLogits]]:
            return self.client.fetch(images, list(asked), asked, logits_form=logits_form)

        try:
            pending = self.client.submit(images, list(asked), asked, logits_form=logits_form)
        except TeacherServiceError as error:
            if not _is_outage(error):
                raise
            failed = error
            return lambda: self._outputs(self._after_outage(failed, submitted_at, again, stop), wanted)

        def outputs() -> TeacherOutputs:
            try:
                result = pending.result()
            except TeacherServiceError as error:
                if not _is_outage(error):
                    raise
                result = self._after_outage(error, submitted_at, again, stop)
            return self._outputs(result, wanted)

        return outputs

    def _after_outage(
        self,
        error: TeacherServiceError,
        submitted_at: float,
        again: Callable[[], _Result],
        stop: threading.Event | None,
    ) -> _Result:
        """`again()` once the service answers: at once when the fetch that failed was submitted before the
        last outage ended (it failed in that outage), else after waiting it out as a new outage."""
        if submitted_at < self._back_at:
            if stop is not None and stop.is_set():
                raise error
            try:
                return again()
            except TeacherServiceError as still:
                if not _is_outage(still):
                    raise
                error = still
        return self._wait_for_service(error, again, stop)

    def _wait_for_service(
        self, error: TeacherServiceError, again: Callable[[], _Result], stop: threading.Event | None
    ) -> _Result:
        """Call `again` with exponential backoff until it does not fail with an outage, for up to
        `outage_wait.budget_seconds`; beyond, a TeacherServiceUnavailable naming the budget."""
        self.outages += 1
        started = time.monotonic()
        try:
            result = wait_out_outage(
                self.outage_wait,
                error,
                again,
                is_outage=lambda failed: isinstance(failed, TeacherServiceError) and _is_outage(failed),
                what=f"teacher service at {self.shown_address}",
                reason=lambda failed: _code_name(cast(TeacherServiceError, failed)),
                stop=stop,
            )
        except TeacherServiceError as last:
            if not _is_outage(last) or (stop is not None and stop.is_set()):
                raise
            waited = time.monotonic() - started
            raise TeacherServiceUnavailable(
                f"teacher service at {self.shown_address} unreachable for {waited:.0f} s, beyond "
                f"teacher_source.outage_wait_seconds ({self.outage_wait.budget_seconds:g} s); last error: "
                f"{_code_name(last)}",
                address=last.address,
                code=last.code,
            ) from last
        finally:
            self.outage_seconds += time.monotonic() - started
        self._back_at = time.monotonic()
        return result

    def _outputs(
        self, result: dict[str, dict[str, torch.Tensor | CompactLogits]], wanted: Sequence[Sequence[str]]
    ) -> TeacherOutputs:
        logits: list[torch.Tensor | CompactLogits | None] = []
        features: list[dict[str, torch.Tensor]] = []
        for name, outputs in zip(self.names, wanted):
            got = result.get(name, {}) if outputs else {}
            logits.append(got.get(LOGITS))
            # Only logits come in the compact form: the taps are tensors.
            features.append({k: cast(torch.Tensor, v) for k, v in got.items() if k != LOGITS})
        return TeacherOutputs(logits=logits, features=features)

    def parameter_counts(self) -> list[int]:
        # The service does not say; the architecture does (built with random weights, never run).
        return [
            sum(p.numel() for p in create_teacher(d.architecture, d.num_classes).model.parameters())
            for d in self.descriptions
        ]

    def counters(self) -> dict[str, float]:
        """The client's totals (`ClientStats`: cache_hits, cache_misses, remote_samples, ...) under their own
        names, but teacher_calls for its Infer requests answered; service_outages and outage_wait_seconds. A
        batch asked again after an outage counts again in samples, the lookups and remote_samples (that work
        is redone), not in teacher_calls (a failed request is not an answered one)."""
        stats = dataclasses.asdict(self.client.stats)
        return {
            "teacher_calls": stats.pop("requests"),
            **stats,
            "service_outages": self.outages,
            "outage_wait_seconds": self.outage_seconds,
        }

    def close(self) -> None:
        self.client.close()
        if self.store is not None:
            self.store.close()


class BankMissError(UserError):
    """Views of a batch that a bank-only run needs and the bank lacks (teacher_source.on_miss: error).
    `warm_command` is the command that fills them, where the caller knows it (the CLI: the config file and
    its --set options)."""

    def __init__(
        self, missing: int, views: int, bank: str, lacking: Sequence[str], warm_command: str | None = None
    ) -> None:
        self.missing, self.views, self.bank = missing, views, bank
        self.lacking, self.warm_command = list(lacking), warm_command
        command = warm_command or "ekd warm CONFIG (the experiment's config and --set options)"
        super().__init__(
            f"the bank {bank} lacks {missing} of the {views} views of a batch ({', '.join(self.lacking)}); "
            f"fill it with: {command}; or set teacher_source.on_miss: compute"
        )

    def with_warm_command(self, command: str) -> BankMissError:
        return BankMissError(self.missing, self.views, self.bank, self.lacking, command)

    def __reduce__(self):  # pickled whole (a Ray Train worker's error reaches the driver pickled)
        return BankMissError, (self.missing, self.views, self.bank, self.lacking, self.warm_command)


@dataclass(frozen=True)
class _Column:
    """One (teacher, output) of a fetch: its entries in the bank."""

    teacher: int
    output: str
    entries: OutputEntries


class BankTeacherSource(TeacherSource):
    """Teacher outputs from a bank that `ekd warm` filled (or a served run's cache), with no teacher service.

    Each batch is one multi-get under the keys the service and `ekd warm` write (`OutputEntries` of each
    teacher's identity: its checkpoint's sha256, preprocessing and taps), and the values come back as the
    served source returns them (float16 entries as float32, compact entries as `CompactLogits`), so a run
    from the bank trains exactly as a served run from the same bank.

    A view the bank lacks (any output of any teacher asked for) is a `BankMissError` saying how many of the
    batch's views are missing; with `compute_misses`, the teachers run here on `device` for the views they
    lack, and their outputs are written to the bank in the stored form and used in that form, so that a
    view computed trains exactly as a view found. The teachers are built either way (their tap shapes are
    read off a forward of one blank image); without `compute_misses` they are released once described.
    `bank` is the bank's URI (shown redacted); `names` name the teachers to the method (default: their zoo
    names). Reads and writes are those of one thread at a time.
    """

    def __init__(
        self,
        teachers: Sequence[Teacher],
        bank: str,
        *,
        names: Sequence[str] | None = None,
        compute_misses: bool = False,
        device: str | torch.device = "cpu",
    ) -> None:
        for teacher in teachers:
            if teacher.spec.weights_sha256 is None:
                raise ConfigError(
                    f"teacher {teacher.spec.name!r} has no weights file, so nothing in a bank is its outputs"
                )
        self.shown_bank = redact(bank)
        self.store = open_store(bank)
        self.specs = [teacher.spec for teacher in teachers]
        self.names = list(names) if names is not None else [spec.name for spec in self.specs]
        engines = [TeacherEngine(teacher, device if compute_misses else "cpu") for teacher in teachers]
        # The service's shapes: every image is resized to the teacher's input size before its forward.
        self.tap_shapes = [engine.feature_shapes(engine.spec.preprocessing.input_size) for engine in engines]
        self.parameters = [sum(p.numel() for p in engine.model.parameters()) for engine in engines]
        self.engines = engines if compute_misses else None
        self.calls = 0  # teacher forward passes for the views the bank lacked
        # (teacher, view) pairs with every output asked for in the bank, and without.
        self.hits = self.misses = 0

    def describe(self, image_size: int) -> list[TeacherInfo]:
        return [
            TeacherInfo(name=name, num_classes=spec.num_classes, feature_shapes=dict(shapes))
            for name, spec, shapes in zip(self.names, self.specs, self.tap_shapes, strict=True)
        ]

    def fetch(
        self, images: torch.Tensor, wanted: Sequence[Sequence[str]], *, logits_form: str = FULL
    ) -> TeacherOutputs:
        columns = [
            _Column(
                teacher,
                output,
                OutputEntries.of(
                    self.specs[teacher].identity, output, DEFAULT_OUTPUT_DTYPE, logits_form=logits_form
                ),
            )
            for teacher, outputs in enumerate(wanted)
            for output in dict.fromkeys(outputs)
        ]
        found: dict[tuple[int, str], list[CachedValue | None]] = {}
        if columns:
            digests = input_digests(images)
            values = self.store.get_many(
                [key for column in columns for key in column.entries.keys(digests)],
                [self._value_spec(column) for column in columns for _ in digests],
            )
            for index, column in enumerate(columns):
                found[column.teacher, column.output] = values[
                    index * len(digests) : (index + 1) * len(digests)
                ]
            lacking = self._lacking(columns, found, images.shape[0])
            if lacking:
                if self.engines is None:
                    missing = set().union(*lacking.values())
                    raise BankMissError(
                        len(missing),
                        images.shape[0],
                        self.shown_bank,
                        [
                            f"teachers.{column.teacher} {self.names[column.teacher]}: "
                            f"{column.output} ({column.entries.form})"
                            for column in columns
                            if any(value is None for value in found[column.teacher, column.output])
                        ],
                    )
                self._compute(images, digests, columns, found, lacking)
        logits: list[torch.Tensor | CompactLogits | None] = []
        features: list[dict[str, torch.Tensor]] = []
        for teacher, outputs in enumerate(wanted):
            got = {output: _stacked(found[teacher, output]) for output in outputs}
            logits.append(got.pop(LOGITS, None))
            # Only logits come in the compact form: the taps are tensors.
            features.append({name: cast(torch.Tensor, value) for name, value in got.items()})
        return TeacherOutputs(logits=logits, features=features)

    def _value_spec(self, column: _Column) -> ValueSpec:
        spec = self.specs[column.teacher]
        shape = (
            (spec.num_classes,) if column.output == LOGITS else self.tap_shapes[column.teacher][column.output]
        )
        return column.entries.spec(num_classes=spec.num_classes, shape=shape)

    def _lacking(
        self, columns: Sequence[_Column], found: dict[tuple[int, str], list[CachedValue | None]], batch: int
    ) -> dict[int, list[int]]:
        """Per teacher asked for, the rows of the views that lack one of its outputs (none: left out);
        counted as hits and misses."""
        lacking = {}
        for teacher in dict.fromkeys(column.teacher for column in columns):
            rows = [
                row
                for row in range(batch)
                if any(found[teacher, c.output][row] is None for c in columns if c.teacher == teacher)
            ]
            self.hits += batch - len(rows)
            self.misses += len(rows)
            if rows:
                lacking[teacher] = rows
        return lacking

    def _compute(
        self,
        images: torch.Tensor,
        digests: Sequence[bytes],
        columns: Sequence[_Column],
        found: dict[tuple[int, str], list[CachedValue | None]],
        lacking: dict[int, list[int]],
    ) -> None:
        """Run each teacher on the views it lacks, write their outputs to the bank in the stored form (as
        `ekd warm` does) and put them in `found` in that form."""
        assert self.engines is not None  # only a source that computes misses gets here
        items: list[tuple[bytes, CachedValue]] = []
        for teacher, rows in lacking.items():
            teacher_columns = [column for column in columns if column.teacher == teacher]
            computed = self.engines[teacher].infer(
                images[rows], [column.output for column in teacher_columns]
            )
            self.calls += 1
            for column in teacher_columns:
                values = computed[column.output]
                stored: torch.Tensor | CompactLogits = values
                if column.entries.form == COMPACT:
                    stored = compress(values)
                elif column.entries.form == FULL:
                    stored = values.to(DTYPES[DEFAULT_OUTPUT_DTYPE])
                # A quantized value is the float32 logits: the store quantizes what it writes, and the
                # training loop what it is given, alike (`in_soft_label_form`).
                for position, row in enumerate(rows):
                    value = stored[position]
                    found[teacher, column.output][row] = value
                    items.append((column.entries.key(digests[row]), value))
        self.store.put_many(items)

    def parameter_counts(self) -> list[int]:
        return list(self.parameters)

    def counters(self) -> dict[str, float]:
        """teacher_calls: forward passes for views the bank lacked (0 without on_miss: compute);
        cache_hits and cache_misses: (teacher, view) pairs, as the served source counts them."""
        return {"teacher_calls": self.calls, "cache_hits": self.hits, "cache_misses": self.misses}

    def close(self) -> None:
        self.store.close()


def _stacked(values: Sequence[CachedValue | None]) -> torch.Tensor | CompactLogits:
    """One output of a batch from its per-view values (all present): a float32 tensor, or `CompactLogits`."""
    if isinstance(values[0], CompactLogits):
        return CompactLogits.cat([value for value in values if isinstance(value, CompactLogits)])
    return torch.stack([value for value in values if isinstance(value, torch.Tensor)]).float()


def _open_cache(uri: str) -> TeacherOutputStore:
    """The run's cache. One that does not answer yet (down, or still starting beside the trainer) does not
    stop the run: it starts without it, and the client's circuit breaker takes it up once it answers. One
    that answers with a refusal (a wrong password) is a configuration error."""
    try:
        return open_store(uri)
    except CacheUnreachableError as error:
        logger.warning("starting without the output cache for now, the service answers everything: %s", error)
        return open_store(uri, ping_on_open=False)


def _is_outage(error: TeacherServiceError) -> bool:
    """Whether `error` says the service is gone for now: unreachable (or busy beyond the client's retries),
    cancelling the calls in flight as it shuts down (what a restarting service does once its grace period is
    over), or not answering within `teacher_source.timeout_seconds` (frozen or overloaded: the batch is asked
    again; a request that timed out may still be computed there, which costs the service, never the run)."""
    return isinstance(error, TeacherServiceUnavailable) or error.code in (
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )


def _code_name(error: TeacherServiceError) -> str:
    return error.code.name if error.code is not None else "no answer"


def build_teacher_source(cfg: ExperimentConfig, num_classes: int, device: torch.device) -> TeacherSource:
    """The experiment's teacher source, as `teacher_source.kind` says.

    in_process loads every teacher's checkpoint here. bank loads them too, for their identities (the
    bank's keys), and runs them only for the views the bank lacks, with on_miss: compute. served names each
    teacher by `served_as` (default: its zoo name) and, where the checkpoint is present locally, requires the
    service to host exactly that teacher; bank names them so too, so that its runs record what served runs
    from the same bank record (per-teacher loss terms).
    """
    settings = cfg.teacher_source
    if settings.kind == "in_process":
        return InProcessTeacherSource(
            [create_teacher(t.name, num_classes, checkpoint=t.checkpoint) for t in cfg.teachers], device
        )
    if settings.kind == "bank":
        assert settings.cache is not None  # TeacherSourceConfig requires it of a bank source
        for index, teacher in enumerate(cfg.teachers):
            if not Path(teacher.checkpoint).is_file():
                raise ConfigError(
                    f"teachers.{index}.checkpoint: no file at {teacher.checkpoint}; a bank names each "
                    "teacher's outputs by its weights' sha256, so a bank source needs the checkpoint "
                    "(`ekd warm` of the experiment trains a missing one)"
                )
        return BankTeacherSource(
            [create_teacher(t.name, num_classes, checkpoint=t.checkpoint) for t in cfg.teachers],
            settings.cache,
            names=[t.served_as or t.name for t in cfg.teachers],
            compute_misses=settings.on_miss == "compute",
            device=device,
        )
    assert settings.address is not None  # TeacherSourceConfig requires it of a served source
    names = [t.served_as or t.name for t in cfg.teachers]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"teachers {names} share a name on the service, so they would give identical outputs; "
            "give each its own `served_as`"
        )
    expected = [
        create_teacher(t.name, num_classes, checkpoint=t.checkpoint).spec.identity
        if Path(t.checkpoint).is_file()
        else None
        for t in cfg.teachers
    ]
    return ServedTeacherSource(
        settings.address,
        names,
        cache_uri=settings.cache,
        expected_identities=expected,
        timeout_seconds=settings.timeout_seconds,
        max_in_flight=settings.max_in_flight,
        outage_wait=OutageWait.of(settings),
    )
