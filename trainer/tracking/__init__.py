"""Experiment tracking in MLflow: `ekd distill`, every `ekd sweep` trial and `ekd warm` log a run.

A run's parameters are the flattened config (`teachers.0.name`, the keys `--set` takes), its metrics the
epochs' history rows (losses, validation accuracy, stall seconds, the teacher source's counters and cache hit
rate, step = the epoch over every stage) and the test accuracy, its artifacts the results JSON, the plot and
the exported students, its tags the teachers' identities and the bank. The store is embedded by default (a
SQLite file under the output directory, artifacts beside it: nothing to start, `mlflow ui` shows every run of
that directory side by side), a server with `--tracking-uri` or `MLFLOW_TRACKING_URI`, off with
`--no-tracking`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.core.errors import ConfigError
from services.core.redaction import redact
from trainer.config import ExperimentConfig
from trainer.runs.experiment import ExperimentResult

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
STORE_FILE = "mlflow.db"  # the embedded store, under the output directory
SQLITE_PREFIX = "sqlite:///"
ARTIFACTS_FOLDER = "mlartifacts"  # the embedded store's artifacts, beside it
# MLflow's longest parameter value; a longer one (a long list) is cut, the config in results.json is whole.
MAX_PARAM_LENGTH = 6000


@dataclass(frozen=True)
class Tracking:
    """Where runs are tracked: an MLflow tracking URI, and the artifact root of the experiments ekd creates
    there (the embedded store's folder beside it; None: the server's default)."""

    uri: str
    artifact_root: str | None = None

    @classmethod
    def resolve(cls, output_dir: str | os.PathLike, uri: str | None, enabled: bool) -> Tracking | None:
        """The tracking a command asks for: none when disabled, else `uri`, else $MLFLOW_TRACKING_URI, else
        the embedded store under `output_dir`."""
        if not enabled:
            return None
        chosen = uri or os.environ.get(TRACKING_URI_ENV)
        if chosen and not chosen.startswith(SQLITE_PREFIX):
            return cls(chosen)  # a server keeps the artifacts where it is configured to
        store = Path(chosen.removeprefix(SQLITE_PREFIX)) if chosen else Path(output_dir) / STORE_FILE
        root = store.absolute().parent
        root.mkdir(parents=True, exist_ok=True)
        # A SQLite store's artifacts go beside it (MLflow's default would be ./mlruns, wherever ekd runs).
        return cls(f"{SQLITE_PREFIX}{store.absolute()}", (root / ARTIFACTS_FOLDER).as_uri())

    def client(self):
        from mlflow.tracking import MlflowClient  # mlflow takes seconds to import: only where it tracks

        return MlflowClient(self.uri)

    def experiment_id(self, name: str) -> str:
        """The id of MLflow experiment `name`, created when missing (in the embedded store, with its
        artifacts beside the store)."""
        from mlflow.exceptions import MlflowException

        client = self.client()
        try:
            found = client.get_experiment_by_name(name)
            if found is not None:
                return found.experiment_id
            location = f"{self.artifact_root}/{name}" if self.artifact_root else None
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as err:  # an unreachable server, a store that cannot be opened
            problem = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(f"tracking store {self.uri} cannot be used: {problem}") from None


def embedded_store_uri(output_dir: str | os.PathLike) -> str:
    """The embedded store of runs under `output_dir`: what `mlflow ui --backend-store-uri` takes."""
    return f"{SQLITE_PREFIX}{Path(output_dir).absolute() / STORE_FILE}"


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested mappings and lists as dotted keys (list items by index, as `--set` addresses them) to text."""
    if isinstance(data, Mapping):
        items: list[tuple[str, Any]] = [(str(k), v) for k, v in data.items()]
    elif isinstance(data, list | tuple) and any(isinstance(v, Mapping) for v in data):
        items = [(str(i), v) for i, v in enumerate(data)]
    else:
        return {prefix: str(data)[:MAX_PARAM_LENGTH]}
    flat: dict[str, str] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else key))
    return flat


def experiment_params(cfg: ExperimentConfig) -> dict[str, str]:
    """The flattened config, secrets redacted."""
    return flatten(cfg.shown_json())


def experiment_tags(cfg: ExperimentConfig) -> dict[str, str]:
    """What a run of `cfg` is: the method, the teachers by name, the teacher source and its bank."""
    tags = {
        "ekd.experiment": cfg.name,
        "ekd.method": cfg.method.name,
        "ekd.teacher_source": cfg.teacher_source.kind,
        "ekd.bank": cfg.teacher_source.shown_cache or "",
    }
    for index, teacher in enumerate(cfg.teachers):
        tags[f"ekd.teacher.{index}"] = teacher.name
    return tags


def epoch_metrics(row: Mapping[str, float]) -> dict[str, float]:
    """An epoch's metrics: its history row (less the epoch and stage, which are the step) and, where the
    source has a cache, the hit rate so far."""
    metrics = {k: float(v) for k, v in row.items() if k not in ("epoch", "stage")}
    lookups = row.get("cache_hits", 0) + row.get("cache_misses", 0)
    if lookups:
        metrics["cache_hit_rate"] = row.get("cache_hits", 0) / lookups
    return metrics


class RunTracker:
    """One MLflow run of an experiment (or a warm job) in progress."""

    def __init__(self, tracking: Tracking, run_id: str) -> None:
        self.tracking = tracking
        self.client = tracking.client()
        self.run_id = run_id
        self.epochs = 0

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), timestamp, step) for k, v in metrics.items()]
        )

    def log_epoch(self, row: Mapping[str, float]) -> None:
        """The epoch just trained (its history row and the counters so far), at step = epochs so far."""
        self.log_metrics(epoch_metrics(row), step=self.epochs)
        self.epochs += 1

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_result(self, result: ExperimentResult) -> None:
        """A finished experiment (`ExperimentResult`): its test accuracy and totals, the teachers' identities,
        its record and exported students."""
        self.log_metrics(
            {
                "test_accuracy": result.test_accuracy,
                "seconds": result.seconds,
                "stall_seconds_total": result.stall_seconds,
                "optimizer_steps": result.optimizer_steps,
                **{f"total_{name}": value for name, value in result.counters.items()},
                **{f"test_accuracy.{s.name}": s.test_accuracy for s in result.students},
            },
            step=self.epochs,
        )
        self.set_tags(
            {
                f"ekd.teacher.{index}.identity": teacher.identity
                for index, teacher in enumerate(result.teachers)
                if teacher.identity
            }
        )
        run_dir = Path(result.run_dir)
        record = run_dir / f"results_seed{result.seed}.json"
        if record.is_file():
            self.log_artifact(record)
        students = run_dir / "students" / f"seed{result.seed}"
        if students.is_dir():
            self.client.log_artifacts(self.run_id, str(students), artifact_path="students")

    def log_artifact(self, path: str | os.PathLike) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


@contextlib.contextmanager
def tracked_run(
    tracking: Tracking, experiment: str, run_name: str, params: Mapping[str, str], tags: Mapping[str, str]
) -> Iterator[RunTracker]:
    """A new run of MLflow experiment `experiment`, ended FINISHED, or FAILED (KILLED on Ctrl-C) when the
    block raises."""
    client = tracking.client()
    run = client.create_run(tracking.experiment_id(experiment), run_name=run_name, tags=dict(tags))
    tracker = RunTracker(tracking, run.info.run_id)
    tracker.log_params(params)
    try:
        yield tracker
    except KeyboardInterrupt:
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()


def tracked_experiment(
    tracking: Tracking | None,
    cfg: ExperimentConfig,
    run: Callable[..., ExperimentResult],
) -> tuple[ExperimentResult, str | None]:
    """`run(on_epoch_end=...)` as a tracked run of MLflow experiment `cfg.name` (named `<name>-seed<seed>`),
    with its epochs and result logged; the result and the MLflow run id (None without tracking)."""
    if tracking is None:
        return run(on_epoch_end=None), None
    name = f"{cfg.name}-seed{cfg.seed}"
    with tracked_run(tracking, cfg.name, name, experiment_params(cfg), experiment_tags(cfg)) as tracker:
        result = run(on_epoch_end=tracker.log_epoch)
        tracker.log_result(result)
    return result, tracker.run_id


def log_artifacts(tracking: Tracking | None, run_ids: Iterable[str | None], paths: Iterable[Path]) -> None:
    """Add files (a command's results JSON and plot, written after its runs) to each of its runs."""
    if tracking is None:
        return
    client = tracking.client()
    files = [str(p) for p in paths]
    for run_id in run_ids:
        if run_id is not None:
            for path in files:
                client.log_artifact(run_id, path)


def log_warm(
    tracking: Tracking | None, cfg: ExperimentConfig, cache_uri: str, batch_size: int, warmed: list
) -> None:
    """An `ekd warm` job as a run of MLflow experiment `cfg.name` named `warm`: the config and the bank as
    parameters, each teacher's views, cached, computed and bytes written as metrics (`<teacher index>.*`), the
    teachers' bank tags and the bank as tags."""
    if tracking is None:
        return
    tags = {**experiment_tags(cfg), "ekd.command": "warm", "ekd.bank": redact(cache_uri)}
    tags.update({f"ekd.teacher.{i}.tag": t.tag for i, t in enumerate(warmed)})
    params = {**experiment_params(cfg), "warm.cache": redact(cache_uri), "warm.batch_size": str(batch_size)}
    with tracked_run(tracking, cfg.name, "warm", params, tags) as tracker:
        for index, teacher in enumerate(warmed):
            tracker.log_metrics(
                {
                    f"teacher{index}.views": teacher.views,
                    f"teacher{index}.already_cached": teacher.cached,
                    f"teacher{index}.computed": teacher.computed,
                    f"teacher{index}.bytes_written": teacher.bytes_written,
                    f"teacher{index}.views_per_second": teacher.views_per_second,
                }
            )
