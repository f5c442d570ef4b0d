"""Baselines (the same network trained alone with CE), the gain the results table shows, and epochs from a
step budget."""

import pytest

from trainer.config import ExperimentConfig, OptimConfig, alone_experiment_name
from trainer.results.baselines import alone_experiment, alone_experiments
from trainer.results.report import gain, results_table
from trainer.runs.experiment import ExperimentResult, ExportedStudent
from trainer.runs.loop import resolved_epochs
from trainer.students import StudentConfig

OKD = {
    "name": "digits-okd",
    "data": {"train_fraction": 0.1, "val_fraction": 0},
    "method": {"name": "okd", "depth": 8},
    "train": {"steps": 138, "nesterov": True, "schedule": "multistep"},
}


def test_baseline_is_the_experiment_with_ce_on_the_network_and_nothing_else_changed():
    cfg = ExperimentConfig.model_validate(OKD)
    narrow = StudentConfig(arch="cifar_resnet8", options={"width": 0.2, "full_width_stem": True})
    baseline = alone_experiment(cfg, narrow)
    assert baseline.name == "digits-okd-alone-cifar_resnet8-full_width_stem-width0.2"
    assert baseline.name == alone_experiment_name("digits-okd", narrow)
    assert baseline.method.name == "ce" and baseline.method.student == narrow and baseline.teachers == []
    assert (baseline.data, baseline.train, baseline.seed) == (cfg.data, cfg.train, cfg.seed)
    plain = StudentConfig(arch="cifar_resnet8").model_dump(mode="json")
    assert [c.name for c in alone_experiments(cfg, [plain, plain, narrow.model_dump(mode="json")])] == [
        "digits-okd-alone-cifar_resnet8",
        baseline.name,
    ]


def test_epochs_from_a_step_budget_make_the_same_number_of_steps_at_every_training_size():
    budget = OptimConfig(steps=138)
    assert [resolved_epochs(budget, batches) for batches in (2, 3, 6, 23)] == [69, 46, 23, 6]
    assert resolved_epochs(OptimConfig(steps=10), 4) == 3  # rounded up to whole epochs
    assert resolved_epochs(OptimConfig(steps=10, accumulate_steps=2), 4) == 5
    assert resolved_epochs(OptimConfig(epochs=7), 23) == 7


def _result(name: str, seed: int, accuracy: float, students: list[ExportedStudent]) -> ExperimentResult:
    return ExperimentResult(
        name=name,
        method="okd" if students else "ce",
        seed=seed,
        test_accuracy=accuracy,
        val_accuracy=None,
        student_params=1,
        teachers=[],
        students=students,
        seconds=1.0,
        stall_seconds=0.0,
        run_dir="runs/x",
        headline=students[0].name if students else "student",
    )


def test_gain_is_absolute_in_points_and_relative_to_the_baseline():
    # BOC-KD's headline: 42.26 % alone, 46.76 % distilled: +4.50 points, +10.65 % relative.
    absolute, relative = gain(0.4676, 0.4226)
    assert absolute == pytest.approx(4.50) and relative == pytest.approx(10.648, abs=1e-3)


def test_results_table_shows_each_student_beside_its_baseline():
    link = "digits-okd-alone-cifar_resnet8-full_width_stem-width0.2"
    results = [
        _result("digits-okd", seed, 0.9, [ExportedStudent("student_w0.2", 1, acc, "p", {}, link)])
        for seed, acc in ((0, 0.50), (1, 0.60))
    ] + [_result(link, seed, acc, []) for seed, acc in ((0, 0.40), (1, 0.40))]
    table = results_table(results)
    row = next(i for i, cell in enumerate(table.columns[0]._cells) if "student_w0.2" in cell)
    cells = {column.header: column._cells[row] for column in table.columns}
    assert cells["alone (CE)"] == "40.00% ± 0.00%"
    assert cells["gain"] == "+15.00 pp (+37.5 %)"
