"""The Ray Train adapter (`execution.backend: ray_train`): the experiment's student training run by a
`TorchTrainer` over `execution.workers` workers, data-parallel (DistributedDataParallel over gloo on CPU,
NCCL on GPU), checkpointed every epoch and resumed from the last checkpoint when a worker fails.

The driver (`run_on_ray_train`) trains missing teachers first (once, before any worker reads their
checkpoints), makes every path in the config absolute (Ray workers run in a directory of Ray's own), and
starts the trainer. Each worker runs the plain-PyTorch `ExperimentSession` of trainer/runs/experiment.py on
its shard of every epoch with its own in-process teacher source; after each epoch every worker calls
`ray.train.report`, worker 0 with a checkpoint holding `ExperimentSession.training_state()` (tensors and plain
data, read back with `torch.load(..., weights_only=True)`). A restarted worker group (up to
`execution.max_failures` times) resumes from the last checkpoint Ray Train committed, so no finished epoch is
trained twice; `counters["resumes"]` in the result, and the `resumes` field of each history row, count the
resumes. The checkpoint also holds the teacher source's counters up to its epoch, summed over the workers, so
a resumed run reports the totals of the epochs it kept (what a dead worker group did after its last
checkpoint is lost with it, and is counted once, when it is redone). At the end worker 0 evaluates, exports
the students and writes the record exactly as the local backend does, and returns the result to the driver
(Ray Train's `Result.return_value`, as plain data). Worker 0 also appends each epoch's history row and
counters to a file the driver follows: the progress bar, and the driver's `on_epoch_end` (tracking, Tune).
GPUs are used when `device` is cuda, or auto on a cluster that has GPUs: one per worker. On a cluster of
several nodes (`ray_address`), the teacher checkpoints, `output_dir` and a local `storage_path` must lie on
a filesystem that every node shares. Losing a node is a worker failure like any other: Ray Train's
controller (on the driver's node) sees the group's worker there die, ends the group and starts a new one
where resources are left (`execution.placement_strategy: SPREAD` puts one worker per node, and lets the
restarted group pack onto the surviving nodes), which resumes from the last committed checkpoint.

Failure injection, to check recovery: with `EKD_FAIL_ONCE_AT_EPOCH=<k>` (k ≥ 1) and `EKD_FAIL_MARKER=<path>`
in the environment of the process that calls `run_on_ray_train`, the last worker (rank 1 of 2) exits with
`os._exit(1)` at the start of epoch k (counted over all stages from 0: stage s, epoch e is s · epochs + e),
after the checkpoint of epoch k − 1 is committed, unless the marker file exists; it creates the marker first,
so the run fails exactly once.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import ray
import ray.train
import torch
from ray.train import Checkpoint
from ray.train.torch import get_device
from torch.nn.parallel import DistributedDataParallel

if TYPE_CHECKING:
    # What ray.train and ray.train.torch export under Ray Train v2, the default, which this adapter needs (its
    # workers return the result: `Result.return_value`); type checkers see the v1 names they import first.
    from ray.train.v2.api.config import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.torch.torch_trainer import TorchTrainer
else:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

from trainer.config import ExperimentConfig
from trainer.methods.base import Method
from trainer.runs.experiment import EpochEndCallback, ExperimentResult, ExperimentSession, ensure_teachers
from trainer.runs.inputs import load_splits
from trainer.runs.loop import Shard, resolve_device
from trainer.runs.progress import OnProgress, ProgressUpdate
from trainer.runs.ray_address import ray_init_address

FAIL_AT_EPOCH_ENV = "EKD_FAIL_ONCE_AT_EPOCH"
FAIL_MARKER_ENV = "EKD_FAIL_MARKER"
logger = logging.getLogger(__name__)

TRAINING_STATE_FILE = "training_state.pt"
CHECKPOINTS_KEPT = 2
PROGRESS_POLL_SECONDS = 1.0


def run_on_ray_train(
    cfg: ExperimentConfig,
    *,
    on_progress: OnProgress | None = None,
    ray_address: str | None = None,
    on_epoch_end: EpochEndCallback | None = None,
) -> ExperimentResult:
    """Run `cfg` on Ray Train. Uses the Ray instance this process is already connected to, else connects to
    `ray_address`, else starts a local one (shut down again at the end). `on_epoch_end` hears of each epoch
    worker 0 ends, in this process: its history row and the counters over every worker so far."""
    started = time.time()
    cfg = cfg.with_absolute_paths()
    failure = _failure_injection()
    if cfg.teachers and cfg.teacher_source.kind == "in_process":
        # The driver trains missing teachers on its own GPU if it has one (a Tune trial's driver has none).
        driver_device = resolve_device("auto" if cfg.device == "cuda" else cfg.device)
        ensure_teachers(cfg, load_splits(cfg), driver_device, on_progress)
    run_name = f"{cfg.name}-seed{cfg.seed}-{datetime.now():%Y%m%d-%H%M%S-%f}"
    started_ray = not ray.is_initialized()
    if started_ray:
        if ray_address is None:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance needs no tokens
        ray.init(address=ray_init_address(ray_address), include_dashboard=False)
    try:
        # GPUs for the workers when the config says cuda, or auto on a cluster that has them.
        use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
        logger.info(
            "ray_train: %d workers on %s, run %s under %s",
            cfg.execution.workers,
            "cuda" if use_gpu else "cpu",
            run_name,
            cfg.execution.storage_path,
        )
        progress_file = Path(cfg.execution.storage_path) / f"{run_name}.progress"
        progress_file.parent.mkdir(parents=True, exist_ok=True)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "experiment": cfg.model_dump(mode="json"),
                "started": started,
                "failure": failure,
                "progress_file": str(progress_file),
            },
            scaling_config=ScalingConfig(
                num_workers=cfg.execution.workers,
                use_gpu=use_gpu,
                resources_per_worker={
                    "CPU": cfg.execution.cpus_per_worker,
                    **({"GPU": 1} if use_gpu else {}),
                },
                placement_strategy=cfg.execution.placement_strategy,
            ),
            run_config=RunConfig(
                name=run_name,
                storage_path=cfg.execution.storage_path,
                failure_config=FailureConfig(max_failures=cfg.execution.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
            ),
        )
        outcome = _fit_following_epochs(trainer, progress_file, cfg, on_progress, on_epoch_end)
    finally:
        if started_ray:
            ray.shutdown()
    if outcome.return_value is None:
        raise RuntimeError(
            f"ray_train run {run_name} ended without a result from worker 0 (run state under {outcome.path})"
        )
    return ExperimentResult.from_json(outcome.return_value)


def train_loop_per_worker(config: dict) -> dict | None:
    """One Ray Train worker: its shard of the experiment; worker 0 returns the result as plain data."""
    cfg = ExperimentConfig.model_validate(config["experiment"])
    context = ray.train.get_context()
    shard = Shard(context.get_world_rank(), context.get_world_size())
    device = get_device()
    session = ExperimentSession(
        cfg, splits=load_splits(cfg), device=device, started=config["started"], shard=shard
    )
    failure = config["failure"]

    def on_epoch_end(row: dict[str, float]) -> None:
        counters = session.counters_at_epoch_end  # summed over the workers: every worker reaches here
        if session.is_primary:
            epoch = {"stages": session.method.num_stages, "epochs": session.cfg.train.epochs}
            with open(config["progress_file"], "a") as progress_file:
                progress_file.write(json.dumps({**epoch, "row": {**row, **counters}}) + "\n")
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if session.is_primary:
                torch.save(session.training_state(), Path(directory) / TRAINING_STATE_FILE)
                checkpoint = Checkpoint.from_directory(directory)
            ray.train.report(row, checkpoint=checkpoint)
        next_epoch = session.stage * cfg.train.epochs + session.epoch + 1
        if failure is not None and shard.rank == shard.world_size - 1 and next_epoch == failure["epoch"]:
            _fail_once(Path(failure["marker"]))

    session.fit(
        resume=_last_training_state(),
        make_step_module=lambda method: _data_parallel(method, device),
        on_epoch_end=on_epoch_end,
    )
    result = session.finish()
    return result.to_json() if result is not None else None


def _fit_following_epochs(
    trainer: TorchTrainer,
    progress_file: Path,
    cfg: ExperimentConfig,
    on_progress: OnProgress | None,
    on_epoch_end: EpochEndCallback | None,
):
    """`trainer.fit()`, while this process follows the epochs worker 0 appends to `progress_file` (a JSON line
    per epoch: the method's stages, `train.steps`' epochs as resolved, and the history row with the counters;
    the driver cannot see into the workers otherwise): a progress bar, and `on_epoch_end` for each."""
    if on_progress is None and on_epoch_end is None:
        return trainer.fit()
    task = f"{cfg.name} (ray_train)"
    if on_progress is not None:
        on_progress(ProgressUpdate(task, 0, cfg.train.epochs, task))
    outcome: dict = {}
    seen = 0

    def follow() -> None:
        nonlocal seen
        lines = progress_file.read_text().splitlines(keepends=True) if progress_file.exists() else []
        finished = [json.loads(line) for line in lines[seen:] if line.endswith("\n")]  # whole lines only
        seen += len(finished)
        for epoch in finished:
            row = epoch["row"]
            if on_epoch_end is not None:
                on_epoch_end(row)
            if on_progress is not None:
                stages, stage, epochs, number = epoch["stages"], row["stage"], epoch["epochs"], row["epoch"]
                description = f"{task} stage {stage + 1}/{stages} epoch {number + 1}/{epochs}"
                if "val_accuracy" in row:
                    description += f" val {row['val_accuracy']:.1%}"
                completed = stage * epochs + number + 1
                on_progress(ProgressUpdate(task, completed, total=stages * epochs, description=description))

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # re-raised in the calling thread
            outcome["error"] = err

    worker = threading.Thread(target=fit, name="ekd-ray-train-fit", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(timeout=PROGRESS_POLL_SECONDS)
        follow()
    follow()  # what the last epoch wrote just before the run ended
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _data_parallel(method: Method, device: torch.device) -> DistributedDataParallel:
    # A method may leave some of its trainable parameters out of a step's graph (an optional term switched
    # off, a branch a loss does not reach); DDP then needs find_unused_parameters, or it waits for their
    # gradients forever. The cost is one graph traversal per step.
    return DistributedDataParallel(
        method, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=True
    )


def _last_training_state() -> dict | None:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / TRAINING_STATE_FILE, map_location="cpu", weights_only=True)


def _fail_once(marker: Path) -> None:
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    # Wait until Ray Train has committed the checkpoint just reported: the failure then comes after it, and
    # the restarted workers resume from it.
    ray.train.get_all_reported_checkpoints()
    os._exit(1)


def _failure_injection() -> dict | None:
    """The driver's EKD_FAIL_ONCE_AT_EPOCH / EKD_FAIL_MARKER, checked, for the workers' config (a Ray
    instance started earlier would not hand the driver's current environment to its workers)."""
    epoch = os.environ.get(FAIL_AT_EPOCH_ENV)
    if epoch is None:
        return None
    marker = os.environ.get(FAIL_MARKER_ENV)
    if not marker:
        raise ValueError(
            f"{FAIL_AT_EPOCH_ENV}={epoch} needs {FAIL_MARKER_ENV}=<path>: the file that records "
            "that the injected failure has happened"
        )
    if not epoch.isdigit() or int(epoch) < 1:
        raise ValueError(
            f"{FAIL_AT_EPOCH_ENV} must be an epoch index >= 1 (the failure follows the "
            f"checkpoint of the epoch before), got {epoch!r}"
        )
    return {"epoch": int(epoch), "marker": str(Path(marker).absolute())}
