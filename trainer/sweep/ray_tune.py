"""The Ray Tune adapter of `ekd sweep`: each trial one experiment inside a Tune trial, `concurrent` at a
time, on a private local Ray or the cluster at `address`. A trial of `execution.backend: local` trains in the
trial's process, with the trial's resources (`cpus_per_trial`, `gpus_per_trial`); one of `ray_train` is the
driver of a Ray Train run (Ray's Train-in-Tune pattern): its workers reserve their own CPUs and GPUs, so the
trial reserves `cpus_per_trial` for the driver and no GPU.

Each epoch is reported to Tune (`tune.report`: validation accuracy for ASHA, the teacher calls so far) and,
with tracking, logged to MLflow through Ray's integration (`setup_mlflow` opens the trial's run). As each
trial ends, the driver records its outcome under `<sweep dir>/ended` (written whole or not at all), and the
sweep's outcomes are read back from there. A rerun of the same sweep skips the trials recorded as done or
stopped early and runs the others in a new Tune run, so a sweep survives Ctrl-C or a driver killed at any
instant: ekd's own record, not Tune's saved state (which a kill mid-write tears), says what ended. A finished
trial is never lost; one the kill caught between its end and its record runs again. A trial that fails is an
errored Tune trial: the others go on, its error is its row's, and a rerun runs it again. The trial configs
reach the trials as Tune parameters (`tune.with_parameters`), never written to Tune's folder: a cache
password stays off disk.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from ray.air.integrations.mlflow import setup_mlflow
from ray.tune.schedulers import ASHAScheduler

from trainer.config import ExperimentConfig
from trainer.results.baselines import alone_experiments
from trainer.runs.ray_address import ray_init_address
from trainer.runs.run import run_experiment
from trainer.sweep.report import (
    DONE,
    FAILED,
    INTERRUPTED,
    STOPPED,
    TrialOutcome,
    ended_trials,
    progress_line,
    save_ended_trial,
)
from trainer.sweep.spec import SweepSpec, Trial
from trainer.tracking import RunTracker, Tracking, experiment_params, experiment_tags

TUNE_FOLDER = "tune"  # Tune's experiment folder under the sweep's: its trials' logs and errors
ENDED_FOLDER = "ended"  # a record per ended trial under the sweep's folder (`save_ended_trial`)
VALIDATION_METRIC = "val_accuracy"  # what ASHA compares

logger = logging.getLogger(__name__)


class _WithoutTunesRestoreAdvice(logging.Filter):
    """Tune's advice after Ctrl-C (`Tuner.restore(...)`): a rerun of the same `ekd sweep` resumes instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Resume experiment with" not in record.getMessage()


logging.getLogger("ray.tune.tune").addFilter(_WithoutTunesRestoreAdvice())


def run_trial(
    params: dict,
    *,
    configs: dict[str, dict],
    tracking: Tracking | None,
    sweep: str,
    threads: int,
    baselines: bool = False,
) -> None:
    """One Tune trial: the experiment `configs[params["trial"]]`, reported per epoch and at the end; with
    `baselines`, then each network it exports trained alone with CE."""
    trial_id = params["trial"]
    cfg = ExperimentConfig.model_validate(configs[trial_id])
    torch.set_num_threads(threads)
    mlflow: Any = None
    tracker: RunTracker | None = None
    if tracking is not None:
        mlflow = setup_mlflow(
            config=experiment_params(cfg),
            tracking_uri=tracking.uri,
            experiment_name=sweep,
            run_name=trial_id,
            tags={**experiment_tags(cfg), "ekd.sweep": sweep, "ekd.trial": trial_id},
        )
        tracker = RunTracker(tracking, mlflow.active_run().info.run_id)

    def on_epoch_end(row: dict[str, float]) -> None:
        if tracker is not None:
            tracker.log_epoch(row)
        tune.report(
            {
                "epoch": row["epoch"],
                "loss": row["loss"],
                "teacher_calls": row.get("teacher_calls", 0),
                **({VALIDATION_METRIC: row[VALIDATION_METRIC]} if VALIDATION_METRIC in row else {}),
            }
        )

    try:
        result = run_experiment(cfg, on_epoch_end=on_epoch_end)
        if tracker is not None:
            tracker.log_result(result)
        networks = [s.alone_network for s in result.students if s.alone_network is not None]
        for alone in alone_experiments(cfg, networks) if baselines else []:
            run_experiment(alone)
    except BaseException:
        if mlflow is not None:
            mlflow.end_run("FAILED")
        raise
    if mlflow is not None:
        mlflow.end_run()
    tune.report(
        {
            "test_accuracy": result.test_accuracy,
            "teacher_calls": result.counters.get("teacher_calls", 0),
            "seconds": result.seconds,
            "results": str(Path(result.run_dir) / f"results_seed{result.seed}.json"),
            **({VALIDATION_METRIC: result.val_accuracy} if result.val_accuracy is not None else {}),
        }
    )


def trial_folder(trial) -> str:
    """A Tune trial's folder: the ekd trial id (Tune adds a suffix when a rerun finds the folder there)."""
    return trial.config["trial"]


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def outcome_of(trial: Trial, metrics: dict, error: BaseException | None) -> TrialOutcome:
    """A trial's row from what it reported last (Tune's metrics) and its error."""
    outcome = TrialOutcome(
        trial.id,
        trial.experiment,
        trial.fields,
        DONE if "test_accuracy" in metrics else STOPPED,
        test_accuracy=metrics.get("test_accuracy"),
        val_accuracy=metrics.get(VALIDATION_METRIC),
        teacher_calls=metrics.get("teacher_calls"),
        seconds=metrics.get("seconds", metrics.get("time_total_s")),
        epochs=int(metrics.get("epoch", -1)) + 1 if "epoch" in metrics else 0,
        results=metrics.get("results"),
    )
    if error is not None:
        outcome.status, outcome.error = FAILED, _last_line(error)
    return outcome


class _TrialEnds(tune.Callback):
    """As each trial ends: its record under `folder`, then a line in the log."""

    def __init__(self, trials: list[Trial], folder: Path, ended_before: int) -> None:
        self.trials = {t.id: t for t in trials}
        self.folder = folder
        self.total = ended_before + len(trials)
        self.finished = ended_before

    def _ended(self, trial, error: BaseException | None) -> None:
        self.finished += 1
        outcome = outcome_of(self.trials[trial.config["trial"]], trial.last_result or {}, error)
        save_ended_trial(outcome, self.folder)
        logger.info("%s", progress_line(outcome, self.finished, self.total))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._ended(trial, None)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._ended(trial, trial.get_error() or RuntimeError("the trial failed"))


def _connect(address: str | None) -> bool:
    """Connect to the cluster at `address`, else start a private local Ray; True when this call started it."""
    if ray.is_initialized():
        return False
    if address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance needs no tokens
    ray.init(address=ray_init_address(address), include_dashboard=False, log_to_driver=False)
    return True


def _resources(spec: SweepSpec, cfg: ExperimentConfig) -> tune.PlacementGroupFactory:
    """What Tune reserves for a trial running `cfg` (the module doc)."""
    gpus = 0.0 if cfg.execution.backend == "ray_train" else spec.gpus_per_trial
    if gpus is None:
        cluster_gpus = ray.cluster_resources().get("GPU", 0)
        gpus = min(1.0, cluster_gpus / spec.concurrent) if cluster_gpus else 0.0
    return tune.PlacementGroupFactory([{"CPU": spec.cpus_per_trial, **({"GPU": gpus} if gpus else {})}])


def run_sweep(
    spec: SweepSpec,
    trials: list[Trial],
    configs: dict[str, ExperimentConfig],
    *,
    directory: Path,
    sweep: str,
    tracking: Tracking | None,
    address: str | None = None,
) -> list[TrialOutcome]:
    """Run every trial that an earlier run of this sweep under `directory` did not record as done or stopped
    early, and return one outcome per trial, in the trials' order (those recorded before, as recorded)."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # no Tune console tables: ekd reports the trials
    ended_folder = directory / ENDED_FOLDER
    ids = {t.id for t in trials}
    ended = {i: o for i, o in ended_trials(ended_folder).items() if i in ids and o.status != FAILED}
    to_run = [t for t in trials if t.id not in ended]
    for trial in to_run:  # a failed trial's record goes: it is this run's to write
        (ended_folder / f"{trial.id}.json").unlink(missing_ok=True)
    if ended:
        logger.info(
            "resuming the sweep: %d of %d trials ended before (%s), %d to run",
            len(ended),
            len(trials),
            ended_folder,
            len(to_run),
        )
    cut_short = (
        _run_trials(spec, to_run, configs, directory, sweep, tracking, address, len(ended)) if to_run else {}
    )
    recorded = ended_trials(ended_folder)
    if cut_short:
        logger.info("%d trials cut short: the same command again runs them", len(cut_short))
    outcomes = {**cut_short, **recorded}
    return [outcomes[t.id] for t in trials if t.id in outcomes]


def _run_trials(
    spec: SweepSpec,
    trials: list[Trial],
    configs: dict[str, ExperimentConfig],
    directory: Path,
    sweep: str,
    tracking: Tracking | None,
    address: str | None,
    ended_before: int,
) -> dict[str, TrialOutcome]:
    """`trials` in one Tune run, each recorded under `ENDED_FOLDER` as it ends; returns the trials Ctrl-C cut
    short, by id, with what they reported so far."""
    started_ray = _connect(address)
    try:
        resources = {t.id: _resources(spec, configs[t.id]) for t in trials}
        trainable = tune.with_resources(
            tune.with_parameters(
                run_trial,
                configs={t.id: configs[t.id].model_dump(mode="json") for t in trials},
                tracking=tracking,
                sweep=sweep,
                threads=max(1, int(spec.cpus_per_trial)),
                baselines=spec.baselines,
            ),
            # By trial id, never the configs themselves: Tune saves this with its state, and a config may
            # hold a cache password.
            lambda params: resources[params["trial"]],
        )
        scheduler = None
        if spec.asha is not None:
            epochs = max(configs[t.id].train.epochs for t in trials)
            scheduler = ASHAScheduler(
                metric=VALIDATION_METRIC,
                mode="max",
                # One report per epoch and one at the end: the end must not count as a rung.
                max_t=epochs + 1,
                grace_period=spec.asha.grace_period,
                reduction_factor=spec.asha.reduction_factor,
            )
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([t.id for t in trials])},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=spec.concurrent,
                # A finished trial's process takes the next trial: torch's and the trainer's imports
                # (seconds each) are paid once per concurrent slot, not once per trial.
                reuse_actors=True,
                scheduler=scheduler,
                trial_dirname_creator=trial_folder,
            ),
            run_config=tune.RunConfig(
                name=TUNE_FOLDER,
                storage_path=str(directory),
                verbose=0,
                callbacks=[_TrialEnds(trials, directory / ENDED_FOLDER, ended_before)],
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            ),
        )
        grid = tuner.fit()
        by_id = {t.id: t for t in trials}
        cut_short = {}
        for index in range(len(grid)):
            result = grid[index]
            # By the id in its config, not its folder: Tune adds a suffix ("t004_4dbc") to a folder that a
            # trial of an earlier run left.
            trial = by_id[(result.config or {})["trial"]]  # None only for a result without a trial
            if not (directory / ENDED_FOLDER / f"{trial.id}.json").is_file():
                cut_short[trial.id] = outcome_of(trial, result.metrics or {}, result.error)
                cut_short[trial.id].status = INTERRUPTED
    finally:
        if started_ray:
            ray.shutdown()
    return cut_short
