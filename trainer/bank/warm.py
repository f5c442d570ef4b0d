"""`ekd warm`: the teacher-output bank at full teacher speed, as a Ray Data job (the Ray adapter of
`trainer.bank.writer`).

The job streams the experiment's training split as view ids (view v of sample i, for every replayed view),
makes each view with the code training uses (`trainer.runs.inputs.train_views`, `ReplayedViews.view`; then the
test images, as the teachers' evaluation at the end of a run reads them: full logits), and passes
the views through one actor pool per teacher (`map_batches` over a `TeacherBankWriter` with its
`TeacherEngine`: one GPU per actor where the cluster has GPUs, one CPU actor otherwise). Each actor writes
what is not yet cached, in the chosen form, under the keys the teacher service writes, so that `ekd distill`
of any experiment with the same data and replay settings finds every output. A batch is written whole or not
at all, so Ctrl-C or a killed actor loses nothing written, and a rerun skips it. A cache that does not answer
is waited for, within `teacher_source.outage_wait_seconds`, each writer's warnings shown in the terminal;
past the wait the job stops with one line."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import ray
import torch

from services.cache import open_store, teacher_tag
from services.core.contract import LOGITS
from services.core.errors import ConfigError, UserError
from services.teachers.engine import TeacherEngine
from services.teachers.zoo import create_teacher
from trainer.bank.writer import TeacherBankWriter, requested_outputs, waiting_out_cache_outages
from trainer.config import ExperimentConfig, TeacherConfig
from trainer.runs.inputs import load_splits, train_views
from trainer.runs.outage import OutageWait
from trainer.runs.ray_address import ray_init_address

logger = logging.getLogger(__name__)


class _WithoutProgressBarsNotice(logging.Filter):
    """Ray Data's notice that its own progress bars are off: ekd shows views done per teacher instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Progress bars disabled")


logging.getLogger("ray.data._internal.progress").addFilter(_WithoutProgressBarsNotice())


@dataclass
class TeacherWarmed:
    """One teacher's share of a warm run."""

    name: str
    tag: str
    outputs: list[str]
    form: str
    total: int  # views the job passes through this teacher
    views: int = 0
    cached: int = 0  # already there, skipped
    bytes_written: int = 0
    seconds: float = 0.0  # wall time from the job's start to this teacher's last batch

    @property
    def computed(self) -> int:
        return self.views - self.cached

    @property
    def views_per_second(self) -> float:
        return self.views / self.seconds if self.seconds > 0 else 0.0


class _WriterActor:
    """A `map_batches` actor: one teacher's engine and a cache connection, writing each batch of views."""

    def __init__(
        self,
        teacher: TeacherConfig,
        num_classes: int,
        cache_uri: str,
        outputs: list[str],
        form: str,
        column: str,
        outage_wait: OutageWait,
    ) -> None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        engine = TeacherEngine(
            create_teacher(teacher.name, num_classes, checkpoint=teacher.checkpoint), device
        )
        self.writer = TeacherBankWriter(engine, cache_uri, outputs, form, outage_wait)
        self.column = column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Ray Data's arrays may be read-only views of its blocks; torch wants memory it may write.
        images = torch.from_numpy(np.require(batch["image"], requirements=["C", "W"]))
        # Per-row columns (Ray Data's blocks are tables) whose sums are the batch's counts, and the error a
        # user can fix (a cache that stayed away past the wait) as data: the driver says it in one line, where
        # an exception would reach the terminal as Ray Data's tracebacks. Bugs still raise.
        cached = np.zeros(len(images), dtype=np.int64)
        written_bytes = np.zeros(len(images), dtype=np.int64)
        error = np.full(len(images), "", dtype=object)
        try:
            for evaluation in (False, True):
                rows = np.flatnonzero(batch["evaluation"] == evaluation)
                if len(rows):
                    written = self.writer.write(images[rows], evaluation=evaluation)
                    cached[rows[: written.cached]] = 1
                    written_bytes[rows[0]] = written.bytes_written
        except UserError as failed:
            error[0] = str(failed)
        return {
            **batch,
            f"{self.column}.cached": cached,
            f"{self.column}.bytes": written_bytes,
            f"{self.column}.error": error,
        }


def warm_bank(
    cfg: ExperimentConfig,
    cache_uri: str,
    *,
    batch_size: int = 256,
    ray_address: str | None = None,
    on_batch: Callable[[list[TeacherWarmed]], None] | None = None,
) -> list[TeacherWarmed]:
    """Write every teacher output the experiment trains from into the cache at `cache_uri`, in the form
    `teacher_source.soft_labels` names, on the Ray cluster at `ray_address` (None: a private local instance,
    never a cluster that happens to run on this machine); `on_batch` sees the running totals after each
    batch."""
    if not cfg.teachers:
        raise ConfigError(f"experiment {cfg.name!r} names no teachers: there is nothing to warm")
    # A bad URI fails here, before Ray starts; a cache that does not answer is waited for, as the writers do.
    waiting_out_cache_outages(OutageWait.of(cfg.teacher_source), lambda: open_store(cache_uri).close())
    splits = load_splits(cfg)
    views = train_views(splits, cfg.data)
    per_sample = views.views if views.augments else 1
    total = len(splits.train) * per_sample
    outputs = requested_outputs(cfg, splits.num_classes, splits.in_chans, splits.image_size)
    form = cfg.teacher_source.soft_labels
    warmed = [
        TeacherWarmed(
            t.name,
            teacher_tag(create_teacher(t.name, splits.num_classes, t.checkpoint).spec.identity),
            wanted,
            form if LOGITS in wanted else "full",
            total + len(splits.test),
        )
        for t, wanted in zip(cfg.teachers, outputs, strict=True)
    ]

    def make_views(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        made = [
            (views.view(i % len(views), i // len(views)), False)
            if i < total
            else (splits.test[i - total][0], True)
            for i in map(int, batch["id"])
        ]
        kept = [(image, evaluation) for image, evaluation in made if image is not None]
        return {
            "image": np.stack([image.numpy() for image, _ in kept]),
            "evaluation": np.array([evaluation for _, evaluation in kept]),
        }

    started_ray = not ray.is_initialized()
    if started_ray:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance needs no tokens
        # The writers' log lines reach this terminal: a writer waiting for the cache says so.
        ray.init(address=ray_init_address(ray_address), include_dashboard=False, log_to_driver=True)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        gpus = int(ray.cluster_resources().get("GPU", 0))
        # The training views, then the test images a run evaluates its teachers on (teacher_test_accuracies).
        dataset = ray.data.range(total + len(splits.test)).map_batches(make_views, batch_size=batch_size)
        for index, (teacher, wanted) in enumerate(zip(cfg.teachers, outputs, strict=True)):
            dataset = dataset.map_batches(
                _WriterActor,
                fn_constructor_args=(
                    teacher,
                    splits.num_classes,
                    cache_uri,
                    wanted,
                    form,
                    f"t{index}",
                    OutageWait.of(cfg.teacher_source),
                ),
                batch_size=batch_size,
                # Ray Data restarts a killed pool actor and retries its batch (cached views are skipped).
                compute=ray.data.ActorPoolStrategy(size=max(gpus, 1)),
                num_gpus=1 if gpus else 0,
                # Without GPUs, one actor per teacher shares the CPUs with the view maker; reserving a CPU for
                # each would leave the reading and view-making tasks none, and the job would stall.
                num_cpus=1 if gpus else 0,
            )
        started = time.perf_counter()
        for batch in dataset.drop_columns(["image"]).iter_batches(batch_size=None):
            elapsed = time.perf_counter() - started
            for index, totals in enumerate(warmed):
                failed = [message for message in batch[f"t{index}.error"] if message]
                if failed:
                    raise UserError(f"teacher {totals.name} ({totals.tag}): {failed[0]}")
                totals.views += len(batch[f"t{index}.cached"])
                totals.cached += int(batch[f"t{index}.cached"].sum())
                totals.bytes_written += int(batch[f"t{index}.bytes"].sum())
                totals.seconds = elapsed
            if on_batch is not None:
                on_batch(warmed)
    finally:
        if started_ray:
            ray.shutdown()
    logger.info("warmed %s for %d views of %s", cache_uri, total, cfg.name)
    return warmed
