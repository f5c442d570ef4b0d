"""The Ray Tune adapter of `ekd sweep`: each trial one experiment inside a Tune trial, `concurrent` at a
time, on a private local Ray or the cluster at `address`. A trial of `execution.backend: local` trains in the
trial's process, with the trial's resources (`cpus_per_trial`, `gpus_per_trial`); one of `ray_train` is the
driver of a Ray Train run (Ray's Train-in-Tune pattern): its workers reserve their own CPUs and GPUs, so the
trial reserves `cpus_per_trial` for the driver and no GPU.

Each epoch is reported to Tune (`tune.report`: validation accuracy for ASHA, the teacher calls so far) and,
with tracking, logged to MLflow through Ray's integration (`setup_mlflow` opens the trial's run). Tune keeps
the sweep's state under `<sweep dir>/tune`: a rerun of the same sweep restores it (`Tuner.restore`) and runs
only the trials that had not finished (or had failed), so a sweep survives Ctrl-C or a killed driver. A trial
that fails is an errored Tune trial: the others go on, and its error is its row's. The trial configs reach the
trials as Tune parameters (`tune.with_parameters`), never written to Tune's folder: a cache password stays
off disk.
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
from trainer.sweep.report import DONE, FAILED, STOPPED, TrialOutcome
from trainer.sweep.spec import SweepSpec, Trial
from trainer.tracking import RunTracker, Tracking, experiment_params, experiment_tags

STATE_FOLDER = "tune"  # Tune's experiment folder under the sweep's
# How often Tune saves the sweep's state (seconds): a trial that finished is redone after a killed driver
# only when it finished within this of the kill.
STATE_SAVE_SECONDS = "1"
VALIDATION_METRIC = "val_accuracy"  # what ASHA compares

logger = logging.getLogger(__name__)


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
    """A Tune trial's folder: the ekd trial id, so that every result, errored ones too, names its trial."""
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


class _TrialProgress(tune.Callback):
    """Logs a line as each trial ends (kept with Tune's state, so plain data only)."""

    def __init__(self, trials: list[Trial]) -> None:
        self.trials = {t.id: t for t in trials}
        self.finished = 0

    def _ended(self, trial, error: BaseException | None) -> None:
        from trainer.sweep.report import progress_line

        self.finished += 1
        outcome = outcome_of(self.trials[trial.config["trial"]], trial.last_result or {}, error)
        logger.info("%s", progress_line(outcome, self.finished, len(self.trials)))

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


def can_resume(directory: Path) -> bool:
    """Whether `directory` holds a sweep's Tune state to resume."""
    return tune.Tuner.can_restore(str(directory / STATE_FOLDER))


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
    """Run every trial (the ones a saved state of this sweep under `directory` has not finished) and return
    one outcome per trial, in the trials' order."""
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", STATE_SAVE_SECONDS)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # no Tune console tables: ekd reports the trials
    started_ray = _connect(address)
    try:
        resources = {trial_id: _resources(spec, cfg) for trial_id, cfg in configs.items()}
        trainable = tune.with_resources(
            tune.with_parameters(
                run_trial,
                configs={i: c.model_dump(mode="json") for i, c in configs.items()},
                tracking=tracking,
                sweep=sweep,
                threads=max(1, int(spec.cpus_per_trial)),
                baselines=spec.baselines,
            ),
            # By trial id, never the configs themselves: Tune saves this with its state, and a config may
            # hold a cache password.
            lambda params: resources[params["trial"]],
        )
        path = directory / STATE_FOLDER
        if tune.Tuner.can_restore(str(path)):
            logger.info("resuming the sweep saved under %s", path)
            # Trials that failed run again: a rerun finishes what is not done.
            tuner = tune.Tuner.restore(str(path), trainable=trainable, restart_errored=True)
        else:
            scheduler = None
            if spec.asha is not None:
                epochs = max(c.train.epochs for c in configs.values())
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
                    name=STATE_FOLDER,
                    storage_path=str(directory),
                    verbose=0,
                    callbacks=[_TrialProgress(trials)],
                    failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                ),
            )
        grid = tuner.fit()
        by_id = {t.id: t for t in trials}
        outcomes = {}
        for index in range(len(grid)):
            result = grid[index]
            # By the id in its config, not its folder: a trial started before a killed driver restarts in a
            # folder Tune names anew ("t004_4dbc") when its own already exists.
            config = result.config or {}  # None only for a result without a trial, which a grid has not
            trial = by_id[config["trial"]]
            outcomes[trial.id] = outcome_of(trial, result.metrics or {}, result.error)
    finally:
        if started_ray:
            ray.shutdown()
    return [outcomes[t.id] for t in trials if t.id in outcomes]
