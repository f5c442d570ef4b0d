"""`ekd sweep` on real Ray Tune: digits KD sweeps of temperatures × α, two trials at a time, every trial
reading one teacher bank through a served teacher (real gRPC over 127.0.0.1). After `ekd warm` on Redis,
no trial of a sweep calls a teacher. The driver of the same sweep on LMDB, killed mid-sweep (SIGKILL)
and run again, resumes without redoing the trials that finished; only trials that met a cold view called a
teacher, and every trial is read back from MLflow.

The runs are tiny: digits at 8×8, random-weight cifar_resnet20 teachers, a cifar_resnet8 student, 2 epochs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from test_served_distill import KD, PATIENT_READS, experiment, save_random_teachers, serve_teachers

from services.core.redaction import redact
from trainer.config import ExperimentConfig
from trainer.runs.run import run_experiment
from trainer.sweep.ray_tune import ENDED_FOLDER
from trainer.sweep.report import DONE, ended_trials

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EKD = str(Path(sys.executable).parent / "ekd")
EPOCHS = 2
# Four trials, two at a time: the kill comes once two are done, while the other two have just started.
SWEEP = [
    "--grid",
    "method.temperature=1,4",
    "--grid",
    "method.alpha=0.1,0.5",
    "--concurrent",
    "2",
    "--set",
    f"train.epochs={EPOCHS}",
]
TRIALS = [f"t{i:03d}" for i in range(4)]
# Two trials side by side: enough to show that none of them calls a teacher once the bank is warm.
WARM_SWEEP = ["--grid", "method.temperature=1,4", "--concurrent", "2", "--set", f"train.epochs={EPOCHS}"]
DEADLINE_SECONDS = 900  # a loaded 2-core machine: Ray's start, four trials' imports and training


def served_config(tmp_path: Path, address: str, cache_uri: str) -> Path:
    config = tmp_path / "kd.yaml"
    source = {"kind": "served", "address": address, "cache": cache_uri}
    config.write_text(yaml.safe_dump(experiment(tmp_path, "kd", KD, teacher_source=source)))
    return config


def finished_trials(sweep_dir: Path) -> set[str]:
    """The trials the sweep has recorded as done (a rerun skips them, and those stopped early)."""
    return {t for t, outcome in ended_trials(sweep_dir / ENDED_FOLDER).items() if outcome.status == DONE}


def sweep_record(tmp_path: Path) -> dict[str, dict]:
    record = json.loads((tmp_path / "runs" / "kd-sweep" / "sweep.json").read_text())
    return {trial["id"]: trial for trial in record["trials"]}


def test_a_killed_sweep_resumes_and_every_trial_is_tracked(tmp_path, ray_cluster_env):
    save_random_teachers(tmp_path)
    cache_uri = f"lmdb://{tmp_path / 'cache'}"
    sweep_dir = tmp_path / "runs" / "kd-sweep"
    server, _ = serve_teachers(tmp_path, cache_uri)
    with server:
        command = [EKD, "sweep", str(served_config(tmp_path, server.address, cache_uri)), *SWEEP]
        with (tmp_path / "killed.log").open("w") as log:
            driver = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
                env=ray_cluster_env,
                start_new_session=True,
            )
            deadline = time.monotonic() + DEADLINE_SECONDS
            while len(finished_trials(sweep_dir)) < 2 and driver.poll() is None:
                assert time.monotonic() < deadline, (tmp_path / "killed.log").read_text()
                time.sleep(0.5)
            os.killpg(driver.pid, signal.SIGKILL)  # the driver: Ray ends its job's trials with it
            driver.wait()
        before_kill = finished_trials(sweep_dir)
        assert 2 <= len(before_kill) < len(TRIALS), (tmp_path / "killed.log").read_text()
        records = {t: sweep_dir / "trials" / f"kd-{t}" / "results_seed0.json" for t in TRIALS}
        written = {t: records[t].stat().st_mtime_ns for t in before_kill}

        rerun = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=DEADLINE_SECONDS,
            cwd=tmp_path,
            env=ray_cluster_env,
        )
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming the sweep" in rerun.stderr
    assert all(f" {t} " in rerun.stdout for t in TRIALS)  # the table: one row per trial
    assert {t: records[t].stat().st_mtime_ns for t in before_kill} == written  # not redone
    trials = sweep_record(tmp_path)
    assert all(trials[t]["status"] == "done" and trials[t]["test_accuracy"] is not None for t in TRIALS)
    # Every trial finished before the kill read the views the first ones fetched; a trial run after it found
    # every view in the bank.
    assert sum(trials[t]["teacher_calls"] for t in before_kill) > 0
    assert all(trials[t]["teacher_calls"] == 0 for t in TRIALS if t not in before_kill)
    assert (sweep_dir / "sweep.png").read_bytes()[:4] == b"\x89PNG"

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    sweep = client.get_experiment_by_name("kd-sweep")
    runs = client.search_runs([sweep.experiment_id], filter_string="attributes.status = 'FINISHED'")
    tracked = Counter(run.data.tags["ekd.trial"] for run in runs)
    # Every trial finished and was tracked; those recorded as done at the kill were not redone (one the kill
    # caught between the end of its MLflow run and its record is, and is tracked twice).
    assert set(tracked) == set(TRIALS) and all(tracked[t] == 1 for t in before_kill), tracked
    for run in runs:
        fields = trials[run.data.tags["ekd.trial"]]["fields"]
        assert float(run.data.params["method.temperature"]) == fields["method.temperature"]
        assert float(run.data.params["method.alpha"]) == fields["method.alpha"]
        assert run.data.params["teachers.1.served_as"] == "t1"
        assert (
            run.data.tags["ekd.bank"] == redact(cache_uri)
            and run.data.tags["ekd.teacher.0"] == "cifar_resnet20"
        )
        for metric in (
            "loss",
            "train_accuracy",
            "val_accuracy",
            "teacher_calls",
            "cache_hit_rate",
            "stall_seconds",
        ):
            history = client.get_metric_history(run.info.run_id, metric)
            assert sorted(m.step for m in history) == list(range(EPOCHS)), metric
        assert run.data.metrics["test_accuracy"] == trials[run.data.tags["ekd.trial"]]["test_accuracy"]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"results_seed0.json", "students"} <= artifacts
        assert [a.path for a in client.list_artifacts(run.info.run_id, "students")] == ["students/student.pt"]


def test_after_warm_on_redis_no_trial_calls_a_teacher(tmp_path, redis_url, ray_cluster_env):
    save_random_teachers(tmp_path)
    database = abs(hash(str(tmp_path))) % 15 + 1  # a Redis database of its own
    cache_uri = redis_url[: redis_url.rindex("/")] + f"/{database}?{PATIENT_READS}"
    server, backend = serve_teachers(tmp_path, cache_uri)
    with server:
        config = served_config(tmp_path, server.address, cache_uri)
        warm = subprocess.run(
            [EKD, "warm", str(config), "--set", f"train.epochs={EPOCHS}"],
            capture_output=True,
            text=True,
            timeout=DEADLINE_SECONDS,
            cwd=tmp_path,
            env=ray_cluster_env,
        )
        assert warm.returncode == 0, warm.stderr
        rows = [row.split("│") for row in warm.stdout.splitlines() if "cifar_resnet20" in row]
        assert [row[1].strip() for row in rows] == ["cifar_resnet20"] * 2  # a row per teacher, by zoo name
        calls_at_start = backend.teacher_calls()
        run = subprocess.run(
            [EKD, "sweep", str(config), *WARM_SWEEP, "--no-tracking"],
            capture_output=True,
            text=True,
            timeout=DEADLINE_SECONDS,
            cwd=tmp_path,
            env=ray_cluster_env,
        )
        assert run.returncode == 0, run.stderr
        assert backend.teacher_calls() == calls_at_start
    trials = sweep_record(tmp_path)
    assert sorted(trials) == ["t000", "t001"]
    assert all(trial["teacher_calls"] == 0 and trial["status"] == "done" for trial in trials.values())
    # ekd warm is tracked (by default, in the embedded store under the output directory); the sweep is not.
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    assert client.get_experiment_by_name("kd-sweep") is None
    (warmed,) = client.search_runs([client.get_experiment_by_name("kd").experiment_id])
    assert warmed.info.run_name == "warm" and warmed.data.tags["ekd.bank"] == redact(cache_uri)
    assert warmed.data.metrics["teacher0.computed"] > 0 and warmed.data.params["method.name"] == "kd"


def test_a_ray_train_trial_trains_on_its_workers_and_reports_every_epoch_as_it_ends(
    tmp_path, ray_cluster_env
):
    """A trial of `execution.backend: ray_train` is the driver of a two-worker Ray Train run: its epochs reach
    Tune and MLflow as the workers end them, with the teacher calls of both workers."""
    save_random_teachers(tmp_path)
    config = tmp_path / "kd.yaml"
    execution = {
        "backend": "ray_train",
        "workers": 2,
        "cpus_per_worker": 0.5,
        "storage_path": str(tmp_path / "ray"),
    }
    config.write_text(yaml.safe_dump(experiment(tmp_path, "kd", KD, execution=execution)))
    sweep = ["--grid", "method.temperature=2", "--cpus-per-trial", "0.25", "--set", f"train.epochs={EPOCHS}"]
    run = subprocess.run(
        [EKD, "sweep", str(config), *sweep],
        capture_output=True,
        text=True,
        timeout=DEADLINE_SECONDS,
        cwd=tmp_path,
        env=ray_cluster_env,
    )
    assert run.returncode == 0, run.stderr
    (trial,) = sweep_record(tmp_path).values()
    assert trial["status"] == "done"
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (tracked,) = client.search_runs([client.get_experiment_by_name("kd-sweep").experiment_id])
    assert tracked.data.params["execution.backend"] == "ray_train" and tracked.info.status == "FINISHED"
    for metric in ("loss", "train_accuracy", "val_accuracy", "teacher_calls"):
        history = client.get_metric_history(tracked.info.run_id, metric)
        assert sorted(m.step for m in history) == list(range(EPOCHS)), metric
    calls = [
        m.value
        for m in sorted(client.get_metric_history(tracked.info.run_id, "teacher_calls"), key=lambda m: m.step)
    ]
    # One process takes as many steps as each of two workers (each a half-batch): the counters the trial
    # heard of, epoch by epoch, are both workers'.
    local = experiment(tmp_path, "kd-local", KD, train={"epochs": 1, "lr": 0.05})
    per_process = run_experiment(ExperimentConfig.model_validate(local)).counters["teacher_calls"]
    assert calls == [2 * per_process * (epoch + 1) for epoch in range(EPOCHS)]
    assert trial["teacher_calls"] == calls[-1]
