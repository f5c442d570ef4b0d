"""A sweep made ready to run, before Ray starts: its trials expanded and validated, the checks that only a
sweep needs, its folder (a rerun of the same sweep there resumes it), and the teachers its trials train from
(trained here, once, when missing, rather than by two trials at the same time)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from services.core.errors import ConfigError
from trainer.config import ExperimentConfig
from trainer.runs.experiment import ensure_teachers
from trainer.runs.inputs import load_splits
from trainer.runs.loop import resolve_device
from trainer.runs.progress import OnProgress
from trainer.sweep.spec import SweepSpec, Trial, expand, sweep_dir, sweep_name, trial_config

# The sweep's trials (ids, experiments, fields), to tell a rerun from another sweep in the same folder.
TRIALS_FILE = "trials.json"
RESULTS_FILE = "sweep.json"
PLOT_FILE = "sweep.png"


@dataclass(frozen=True)
class SweepPlan:
    spec: SweepSpec
    trials: list[Trial]
    name: str
    directory: Path
    configs: dict[str, ExperimentConfig]  # what each trial runs (trial_config), by trial id


def plan_sweep(spec: SweepSpec) -> SweepPlan:
    """Every trial validated (a bad value is one ConfigError line naming the field and the value), and the
    sweep's folder; a folder holding another sweep's trials is refused."""
    trials = expand(spec)
    for trial in trials:
        if spec.asha is not None and trial.config.data.val_fraction == 0:
            raise ConfigError(
                f"sweep: early stopping (asha) compares validation accuracy, but trial {trial.id} has no "
                "validation split (data.val_fraction 0)"
            )
    directory = sweep_dir(spec, trials)
    listed = [{"id": t.id, "experiment": t.experiment, "fields": t.fields} for t in trials]
    saved = directory / TRIALS_FILE
    if saved.is_file() and json.loads(saved.read_text()) != json.loads(json.dumps(listed)):
        raise ConfigError(
            f"sweep: {directory} holds another sweep's trials: give this one another name (--name) or "
            f"output directory, or remove that folder"
        )
    directory.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(listed, indent=1))
    configs = {t.id: trial_config(t, directory) for t in trials}
    return SweepPlan(spec, trials, sweep_name(spec, trials), directory, configs)


def train_missing_teachers(plan: SweepPlan, on_progress: OnProgress | None = None) -> None:
    """Train the teachers of in-process trials whose checkpoints are missing, once each, before the trials
    start (two trials would otherwise train the same teacher at once)."""
    for cfg in plan.configs.values():
        missing = any(not Path(t.checkpoint).is_file() for t in cfg.teachers)
        if cfg.teacher_source.kind == "in_process" and missing:
            ensure_teachers(cfg, load_splits(cfg), resolve_device(cfg.device), on_progress)
