"""`ekd distill` logs each run to MLflow (a real embedded SQLite store, read back with `MlflowClient`): the
flattened config, per-epoch metrics, the test accuracy, the results, plot and exported students, the
teachers' identities; `--tracking-uri` logs elsewhere, `--no-tracking` nowhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from test_served_distill import KD, experiment, save_random_teachers
from typer.testing import CliRunner

from services.teachers.zoo import create_teacher
from trainer.cli.main import app

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EPOCHS = 2


def distill(tmp_path: Path, *options: str) -> None:
    config = tmp_path / "kd.yaml"
    config.write_text(yaml.safe_dump(experiment(tmp_path, "kd-tracked", KD)))
    run = CliRunner().invoke(app, ["distill", str(config), "--set", f"train.epochs={EPOCHS}", *options])
    assert run.exit_code == 0, run.output


def test_distill_logs_its_run_to_the_embedded_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    save_random_teachers(tmp_path)
    distill(tmp_path, "--seeds", "0,1")
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("kd-tracked").experiment_id])
    assert sorted(run.info.run_name for run in runs) == ["kd-tracked-seed0", "kd-tracked-seed1"]
    identity = create_teacher("cifar_resnet20", 10, checkpoint=tmp_path / "t0.pt").spec.identity
    for run in runs:
        assert run.info.status == "FINISHED"
        params = run.data.params
        assert params["method.name"] == "kd" and params["train.epochs"] == str(EPOCHS)
        assert params["teachers.0.checkpoint"] == str(tmp_path / "t0.pt")
        assert run.data.tags["ekd.teacher.0.identity"] == identity
        assert run.data.tags["ekd.teacher.1"] == "cifar_resnet20"
        for metric in ("loss", "train_accuracy", "val_accuracy", "teacher_calls", "stall_seconds", "kd"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
            assert sorted(steps) == list(range(EPOCHS)), metric
        assert 0 <= run.data.metrics["test_accuracy"] <= 1 and run.data.metrics["total_teacher_calls"] > 0
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        seed = run.info.run_name.removeprefix("kd-tracked-")
        assert {"results.json", "accuracy_vs_params.png", f"results_{seed}.json", "students"} <= artifacts


def test_tracking_goes_where_asked_or_nowhere(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    save_random_teachers(tmp_path)
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    distill(tmp_path, "--tracking-uri", elsewhere)
    assert not (tmp_path / "runs" / "mlflow.db").exists() and (tmp_path / "mlartifacts").is_dir()
    (run,) = MlflowClient(elsewhere).search_runs(
        [MlflowClient(elsewhere).get_experiment_by_name("kd-tracked").experiment_id]
    )
    assert run.info.status == "FINISHED"
    distill(tmp_path, "--no-tracking")
    assert not (tmp_path / "runs" / "mlflow.db").exists()
