"""`ekd demo`: the whole system at work on digits, in one command.

A local Ray; the digits teacher ensemble trained (or reused from its checkpoints); the teachers served (one
Ray Serve deployment each, the gRPC ingress, the shared LMDB output cache); the experiments of
`DEMO_EXPERIMENTS` trained through Ray Train, those whose method distills from teachers first (on the served
teachers, cache first), then those that need none. One table, one plot. Run it twice: the second run finds
every teacher output in the cache.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import ray
from rich.table import Table

from services.core.redaction import redact
from services.serve.deployments import deploy
from services.serve.serve_config import load_serve_config
from trainer.config import ExecutionConfig, ExperimentConfig, TeacherSourceConfig, load_experiment
from trainer.methods import METHODS
from trainer.runs.experiment import ExperimentResult, ensure_teachers
from trainer.runs.inputs import load_splits
from trainer.runs.loop import resolve_device
from trainer.runs.progress import OnProgress
from trainer.runs.run import run_experiment

logger = logging.getLogger(__name__)

# The shipped digits configs the demo runs: one per method, the ensemble KD beside single-teacher KD (ce and
# feed_sequential are left out to keep the demo within 15 minutes on 2 cores).
DEMO_EXPERIMENTS = ("kd", "kd_ensemble", "student_ensemble", "ekd", "feed_parallel", "one", "okd")


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
    """The demo's experiments: the shipped digits configs, on served teachers and Ray Train; those that
    distill from teachers first."""
    experiments = []
    configs = [load_experiment(configs_dir / f"{name}.yaml") for name in DEMO_EXPERIMENTS]
    configs.sort(key=lambda cfg: not METHODS.get(cfg.method.name).uses_teachers)
    for cfg in configs:
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


def service_ready_line(address: str, cache_uri: str | None) -> str:
    """What the demo says once the teachers are served: the address and the cache, its password redacted."""
    return f"teacher service ready at {address}; cache: {redact(cache_uri) if cache_uri else 'none'}"


def run_demo(
    *,
    configs_dir: Path,
    serve_config: Path,
    output_dir: Path,
    workers: int,
    epochs: int,
    on_progress: OnProgress | None = None,
) -> list[DemoRow]:
    for name in DEMO_EXPERIMENTS:
        cfg = load_experiment(configs_dir / f"{name}.yaml")
        if cfg.teachers:
            ensure_teachers(cfg, load_splits(cfg), resolve_device(cfg.device), on_progress)
    service = load_serve_config(serve_config)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local Ray: nothing to authenticate
    # Logical CPUs: one per teacher replica and per training worker, so Serve and Train can share the machine.
    logical_cpus = max(os.cpu_count() or 1, sum(t.num_replicas for t in service.teachers) + workers + 1)
    ray.init(address="local", num_cpus=logical_cpus, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        address = deploy(service)
        logger.info("%s", service_ready_line(address, service.cache.uri))
        for cfg in demo_experiments(
            configs_dir,
            address=address,
            cache_uri=service.cache.uri,
            workers=workers,
            output_dir=output_dir,
            epochs=epochs,
        ):
            rows.append(DemoRow(run_experiment(cfg, on_progress=on_progress)))
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
