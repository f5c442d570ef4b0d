"""`ekd demo`: the whole system at work on digits, in one command.

A local Ray; the digits teacher ensemble trained (or reused from its checkpoints); the teachers served (one Ray
Serve deployment each, the gRPC ingress, the shared LMDB output cache); kd, kd_ensemble, student_ensemble, ekd
and feed_parallel trained through Ray Train on the served teachers, cache first; then one and okd, which need no
teacher. One table, one plot. Run it twice: the second run finds every teacher output in the cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import ray
from rich.progress import Progress
from rich.table import Table

from services.deployments import deploy
from services.serve_config import load_serve_config
from trainer.config import ExecutionConfig, ExperimentConfig, TeacherSourceConfig, load_experiment
from trainer.experiment import ExperimentResult, Log, ensure_teachers, load_splits, run_experiment
from trainer.loop import resolve_device

SERVED_EXPERIMENTS = ("kd", "kd_ensemble", "student_ensemble", "ekd", "feed_parallel")
TEACHER_FREE_EXPERIMENTS = ("one", "okd")


@dataclass
class DemoRow:
    result: ExperimentResult

    @property
    def hit_rate(self) -> float | None:
        hits = self.result.counters.get("cache_hits", 0)
        total = hits + self.result.counters.get("cache_misses", 0)
        return hits / total if total else None


def demo_experiments(
    configs_dir: Path, *, address: str, cache_uri: str | None, workers: int, output_dir: Path, epochs: int
) -> list[ExperimentConfig]:
    """The demo's experiments: the shipped digits configs, on served teachers and Ray Train."""
    experiments = []
    for name in SERVED_EXPERIMENTS + TEACHER_FREE_EXPERIMENTS:
        cfg = load_experiment(configs_dir / f"{name}.yaml")
        update = {
            "execution": ExecutionConfig(
                backend="ray_train", workers=workers, storage_path=str(output_dir / "ray")
            ),
            "output_dir": str(output_dir),
        }
        if cfg.teachers:
            update["teacher_source"] = TeacherSourceConfig(kind="served", address=address, cache=cache_uri)
        update["train"] = cfg.train.model_copy(update={"epochs": epochs})
        experiments.append(cfg.model_copy(update=update))
    return experiments


def run_demo(
    *,
    configs_dir: Path,
    serve_config: Path,
    output_dir: Path,
    workers: int,
    epochs: int,
    log: Log,
    progress: Progress,
) -> list[DemoRow]:
    first = load_experiment(configs_dir / f"{SERVED_EXPERIMENTS[1]}.yaml")  # names the whole ensemble
    ensure_teachers(first, load_splits(first.data), resolve_device(first.device), log, progress)
    service = load_serve_config(serve_config)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local Ray: nothing to authenticate
    # Logical CPUs: one per teacher replica and per training worker, so Serve and Train can share the machine.
    logical_cpus = max(os.cpu_count() or 1, sum(t.num_replicas for t in service.teachers) + workers + 1)
    ray.init(num_cpus=logical_cpus, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        address = deploy(service)
        log(f"teacher service ready at {address}; cache: {service.cache.uri}")
        for cfg in demo_experiments(
            configs_dir,
            address=address,
            cache_uri=service.cache.uri,
            workers=workers,
            output_dir=output_dir,
            epochs=epochs,
        ):
            rows.append(DemoRow(run_experiment(cfg, log=log, progress=progress)))
    finally:
        ray.shutdown()
    return rows


def demo_table(rows: list[DemoRow]) -> Table:
    table = Table(title="ekd demo: digits, served teachers, Ray Train")
    for column in (
        "method",
        "experiment",
        "student params",
        "test accuracy",
        "teacher calls",
        "cache hit rate",
        "wall time (s)",
    ):
        table.add_column(column, justify="left" if column in ("method", "experiment") else "right")
    for row in rows:
        r = row.result
        table.add_row(
            r.method,
            r.name,
            f"{r.student_params:,}",
            f"{r.test_accuracy:.2%}",
            str(r.counters.get("teacher_calls", 0)) if r.teachers else "—",
            f"{row.hit_rate:.1%}" if row.hit_rate is not None else "—",
            f"{r.seconds:.0f}",
        )
    return table
