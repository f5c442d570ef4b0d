"""Baselines the papers' claims are made against: each network a method produces, trained alone with CE.

A method names, per exported single network, the same network as a student config (`Method.alone_networks`).
Its baseline is a linked experiment: the method's experiment with its data, schedule and seed, but method `ce`
on that network and no teachers, named `<experiment>-alone-<network>` and written beside it (methods differ in
schedule, so each has its own). The results record links each exported student to it
(`ExportedStudent.alone`), and the results table shows the gain.
"""

from __future__ import annotations

from trainer.config import ExperimentConfig, alone_experiment_name
from trainer.students import StudentConfig


def alone_experiment(cfg: ExperimentConfig, student: StudentConfig) -> ExperimentConfig:
    """`cfg` with its method replaced by CE on `student` and no teachers: the same data (training subset
    included), schedule, seed and output directory."""
    data = cfg.model_dump(mode="json")
    data.update(
        name=alone_experiment_name(cfg.name, student),
        method={"name": "ce", "student": student.model_dump(mode="json")},
        teachers=[],
    )
    return ExperimentConfig.model_validate(data)


def alone_experiments(cfg: ExperimentConfig, networks: list[dict]) -> list[ExperimentConfig]:
    """The distinct baseline experiments of these networks (student configs as JSON data, as the results
    record keeps them: `ExportedStudent.alone_network`), one per network however many share it."""
    experiments: dict[str, ExperimentConfig] = {}
    for network in networks:
        student = StudentConfig.model_validate(network)
        experiments.setdefault(alone_experiment_name(cfg.name, student), alone_experiment(cfg, student))
    return list(experiments.values())
