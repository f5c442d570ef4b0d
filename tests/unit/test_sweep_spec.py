"""The sweep spec, before any Ray: trials expanded from a grid, seeds and random draws, every config validated
(a bad value is one line naming the field and the value, exit status 2), the table and the plot; the subset
seed draws another limited-data subset while the split stays put; where tracking goes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from services.core.errors import ConfigError
from trainer.cli.main import app
from trainer.data import load_dataset
from trainer.sweep.plan import plan_sweep
from trainer.sweep.report import (
    DONE,
    FAILED,
    STOPPED,
    TrialOutcome,
    ended_trials,
    plot_sweep,
    save_ended_trial,
    sweep_table,
)
from trainer.sweep.spec import (
    Distribution,
    SweepSpec,
    expand,
    load_sweep,
    parse_grid,
    parse_random,
    sweep_spec,
)
from trainer.tracking import Tracking, embedded_store_uri, flatten

KD = {
    "name": "kd-sweep-spec",
    "data": {"dataset": "digits", "image_size": 8, "views": 2},
    "teachers": [{"name": "cifar_resnet20", "checkpoint": "t0.pt"}],
    "method": {"name": "kd", "student": {"arch": "cifar_resnet8"}, "temperature": 4.0, "alpha": 0.5},
    "train": {"epochs": 2},
}


@pytest.fixture
def experiment(tmp_path: Path) -> Path:
    path = tmp_path / "kd.yaml"
    path.write_text(yaml.safe_dump({**KD, "output_dir": str(tmp_path / "runs")}))
    return path


def flags(config: Path, **given) -> SweepSpec:
    options = dict(
        grid=[],
        random=[],
        samples=None,
        seeds=None,
        concurrent=None,
        cpus_per_trial=None,
        gpus_per_trial=None,
        asha=False,
        name=None,
        output_dir=None,
        teacher_service=None,
        overrides=[],
    )
    return sweep_spec(config, **{**options, **given})


def test_a_grid_and_seeds_expand_to_every_combination_each_validated(experiment):
    spec = flags(
        experiment,
        grid=["method.temperature=1,2,4", "method.alpha=0.1,0.5"],
        seeds=[0, 1],
        overrides=["train.epochs=1"],
    )
    trials = expand(spec)
    assert len(trials) == 12 and [t.id for t in trials[:3]] == ["t000", "t001", "t002"]
    assert spec.swept_fields == ["method.temperature", "method.alpha", "seed"]
    seen = {(t.config.method.temperature, t.config.method.alpha, t.config.seed) for t in trials}
    assert len(seen) == 12 and all(t.config.train.epochs == 1 for t in trials)
    assert trials[0].fields == {"method.temperature": 1, "method.alpha": 0.1, "seed": 0}


def test_random_draws_are_reproducible_and_within_their_distributions(experiment):
    spec = flags(
        experiment, random=["train.lr=loguniform:0.01:0.1", "data.subset_seed=randint:0:100"], samples=4
    )
    first, again = expand(spec), expand(spec)
    assert [t.fields for t in first] == [t.fields for t in again]
    assert len(first) == 4 and all(0.01 <= t.config.train.lr <= 0.1 for t in first)
    assert all(t.config.data.subset_seed in range(100) for t in first)
    assert Distribution.parse("choice:sgd,adamw").choice == ["sgd", "adamw"]
    with pytest.raises(ConfigError, match="uniform:LOW:HIGH"):
        parse_random(["train.lr=normal:0:1"])
    with pytest.raises(ConfigError, match="low < high"):
        parse_random(["train.lr=uniform:2:1"])


@pytest.mark.parametrize(
    ("grid", "named"),
    [
        ("method.temperature=1,-2", "method.temperature=-2: method.kd.temperature"),
        ("method.temprature=1,2", "method.temprature=1: method.kd.temprature"),
        ("data.subset_seed=0,x", "data.subset_seed=x: data.subset_seed"),
    ],
)
def test_a_bad_grid_value_is_one_line_naming_the_field_and_the_value(experiment, grid, named):
    with pytest.raises(ConfigError) as raised:
        expand(flags(experiment, grid=[grid]))
    assert named in str(raised.value) and "\n" not in str(raised.value)


def test_ekd_sweep_refuses_a_bad_value_before_ray_starts(experiment):
    run = CliRunner().invoke(app, ["sweep", str(experiment), "--grid", "method.temperature=1,2,0"])
    assert run.exit_code == 2
    assert "method.temperature=0" in run.output and "greater than 0" in run.output
    assert "Traceback" not in run.output
    assert not (experiment.parent / "runs").exists()  # nothing planned, nothing written


def test_a_sweep_file_lists_experiments_and_flags_add_to_it(tmp_path, experiment):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(
        yaml.safe_dump(
            {"experiments": [str(experiment)], "grid": {"method.alpha": [0.1, 0.9]}, "concurrent": 3}
        )
    )
    spec = flags(sweep_file, grid=["method.temperature=2,3"], seeds=[5])
    assert spec.concurrent == 3 and spec.swept_fields == ["method.alpha", "method.temperature", "seed"]
    assert len(expand(spec)) == 4
    with pytest.raises(ConfigError, match="swept twice"):
        flags(sweep_file, grid=["seed=1,2"], seeds=[0])
    assert parse_grid(["train.optimizer=sgd,adamw"]) == {"train.optimizer": ["sgd", "adamw"]}


def test_a_rerun_of_another_sweep_in_the_same_folder_is_refused(experiment):
    plan = plan_sweep(flags(experiment, grid=["method.alpha=0.1,0.5"]))
    assert plan.directory.name == "kd-sweep-spec-sweep" and (plan.directory / "trials.json").is_file()
    assert plan.configs["t001"].name == "kd-sweep-spec-t001"
    assert Path(plan.configs["t001"].output_dir) == plan.directory / "trials"
    assert plan_sweep(flags(experiment, grid=["method.alpha=0.1,0.5"])).trials == plan.trials  # same sweep
    with pytest.raises(ConfigError, match="another sweep's trials"):
        plan_sweep(flags(experiment, grid=["method.alpha=0.2,0.5"]))


def test_the_table_and_plot_show_every_trial_with_its_error(tmp_path):
    outcomes = [
        TrialOutcome("t000", "kd.yaml", {"method.temperature": 1.0}, DONE, 0.9, 0.88, 120, 5.0, 2),
        TrialOutcome("t001", "kd.yaml", {"method.temperature": 4.0}, DONE, 0.8, 0.81, 0, 4.0, 2),
        TrialOutcome("t002", "kd.yaml", {"method.temperature": 8.0}, FAILED, error="ConfigError: boom"),
    ]
    table = sweep_table(outcomes, ["method.temperature"], "sweep")
    assert table.row_count == 3
    cells = [list(column.cells) for column in table.columns]
    assert cells[-1][2] == "failed: ConfigError: boom" and cells[4][1] == "0"
    path = plot_sweep(outcomes, ["method.temperature"], tmp_path / "sweep.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rerun_skips_the_trials_recorded_as_ended_and_reads_them_back_whole(experiment):
    import ray

    from trainer.sweep.ray_tune import ENDED_FOLDER, run_sweep

    plan = plan_sweep(flags(experiment, grid=["method.alpha=0.1,0.5"]))
    ended = plan.directory / ENDED_FOLDER
    recorded = [
        TrialOutcome(
            "t000", "kd.yaml", {"method.alpha": 0.1}, DONE, 0.9, 0.88, 120, 5.0, 2, results="r.json"
        ),
        TrialOutcome("t001", "kd.yaml", {"method.alpha": 0.5}, STOPPED, None, 0.5, 0, 2.0, 1),
    ]
    for outcome in reversed(recorded):
        save_ended_trial(outcome, ended)
    (ended / ".t001.json.partial").write_text('{"id": "t0')  # what a driver killed mid-write leaves
    outcomes = run_sweep(
        plan.spec, plan.trials, plan.configs, directory=plan.directory, sweep=plan.name, tracking=None
    )
    assert outcomes == recorded and not ray.is_initialized()  # nothing left to run: Ray never started
    (ended / "t001.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"t001\.json is not a record of an ended trial.*remove it"):
        ended_trials(ended)


def _pixels(split) -> torch.Tensor:
    return torch.stack([image for image, _ in split])


def test_the_subset_seed_redraws_the_subset_but_not_the_split():
    base = load_dataset("digits", image_size=8, seed=0, train_fraction=0.1)
    same = load_dataset("digits", image_size=8, seed=0, train_fraction=0.1, subset_seed=0)
    other = load_dataset("digits", image_size=8, seed=0, train_fraction=0.1, subset_seed=1)
    assert _pixels(base.train).equal(_pixels(same.train))
    assert len(base.train) == len(other.train) and not _pixels(base.train).equal(_pixels(other.train))
    assert _pixels(base.val).equal(_pixels(other.val)) and _pixels(base.test).equal(_pixels(other.test))


def test_tracking_is_embedded_by_default_a_server_when_asked_and_off_when_disabled(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    embedded = Tracking.resolve(tmp_path / "runs", None, True)
    assert embedded is not None and embedded.uri == embedded_store_uri(tmp_path / "runs")
    assert embedded.uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert Tracking.resolve(tmp_path, "http://127.0.0.1:5000", True) == Tracking("http://127.0.0.1:5000")
    other = Tracking.resolve(tmp_path, f"sqlite:///{tmp_path / 'other' / 'runs.db'}", True)
    assert other is not None and other.artifact_root == (tmp_path / "other" / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")
    assert Tracking.resolve(tmp_path, None, True) == Tracking("http://127.0.0.1:5001")
    assert Tracking.resolve(tmp_path, None, False) is None
    assert flatten({"a": {"b": 1}, "teachers": [{"name": "x"}], "pair": [1, 2]}) == {
        "a.b": "1",
        "teachers.0.name": "x",
        "pair": "[1, 2]",
    }
    assert json.loads(json.dumps(flatten({"x": None}))) == {"x": "None"}


@pytest.mark.parametrize("name", ["sweep_kd", "sweep_fidelity"])
def test_every_shipped_sweep_expands_to_valid_trials(name, monkeypatch):
    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(repo)  # the sweeps name their experiments from the repository root
    trials = expand(load_sweep(repo / "configs" / "digits" / f"{name}.yaml"))
    assert len(trials) == {"sweep_kd": 6, "sweep_fidelity": 240}[name]
    if name == "sweep_fidelity":  # each fraction and subset draw has teachers of its own
        last = trials[-1]
        assert last.config.teachers[1].checkpoint.endswith(
            f"f{last.fields['data.train_fraction']}-s{last.fields['data.subset_seed']}/cifar_wrn16_4.pt"
        )
