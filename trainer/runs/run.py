"""`run_experiment`: one experiment on the backend its config names.

Kept apart from both backends: `trainer.runs.experiment` (local, plain PyTorch) and `trainer.runs.ray_train`
(the Ray Train adapter, which builds on the former), so that neither imports the other back, and Ray is
imported only when the config asks for it.
"""

from __future__ import annotations

from trainer.config import ExperimentConfig
from trainer.runs.experiment import EpochEndCallback, ExperimentResult, run_locally
from trainer.runs.progress import OnProgress
from trainer.runs.sources import TeacherSource


def run_experiment(
    cfg: ExperimentConfig,
    *,
    on_progress: OnProgress | None = None,
    source: TeacherSource | None = None,
    ray_address: str | None = None,
    on_epoch_end: EpochEndCallback | None = None,
) -> ExperimentResult:
    """Run `cfg` on its `execution.backend`; `source` (local backend only) replaces the configured teacher
    source; `ray_address` (ray_train only) is a running Ray cluster to train on. `on_epoch_end` hears of
    every epoch as it ends: its history row and the teacher source's counters so far (over every worker)."""
    if cfg.execution.backend == "ray_train":
        if source is not None:
            raise ValueError(
                "a teacher source cannot be handed to backend 'ray_train': each worker builds "
                "its own from the config; pass source only with backend 'local'"
            )
        from trainer.runs.ray_train import (
            run_on_ray_train,  # Ray is imported only by the backend that uses it
        )

        return run_on_ray_train(
            cfg, on_progress=on_progress, ray_address=ray_address, on_epoch_end=on_epoch_end
        )
    return run_locally(cfg, on_progress=on_progress, source=source, on_epoch_end=on_epoch_end)
