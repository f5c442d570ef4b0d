"""Distillation from served teachers: the same accuracy as in-process teachers, and teacher outputs reused
across experiments, processes and service restarts, with LMDB and with Redis (real gRPC over 127.0.0.1, a real
redis-server, real LMDB; the second experiment runs as a separate `ekd distill` process). A run stopped after
an epoch and resumed from its training state reports the counters of an uninterrupted one; a cache password
never shows in what `ekd distill` prints or writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import torch
import yaml

from services.cache import open_store
from services.rpc.backends import LocalBackend
from services.rpc.server import BackgroundServer
from services.teachers.engine import TeacherEngine
from services.teachers.spec import Preprocessing
from services.teachers.zoo import create_teacher, save_teacher_checkpoint
from trainer.config import ExperimentConfig
from trainer.runs.experiment import ExperimentResult, ExperimentSession
from trainer.runs.inputs import load_splits
from trainer.runs.run import run_experiment

# One worker runs the module: both caches' tests compare with one in-process run (a module fixture).
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("served_distill")]

EKD = str(Path(sys.executable).parent / "ekd")
# Two teachers of one architecture, told apart by their weights (seeds) and their names on the service.
TEACHERS = [("t0", 0), ("t1", 1)]


def experiment(tmp_path: Path, name: str, method: dict, **extra) -> dict:
    return {
        "name": name,
        "seed": 0,
        "data": {"dataset": "digits", "image_size": 8, "views": 2, "pad": 1, "batch_size": 128},
        "teachers": [
            {
                "name": "cifar_resnet20",
                "checkpoint": str(tmp_path / f"{served}.pt"),
                "seed": seed,
                "served_as": served,
                "train": {"epochs": 2, "lr": 0.05},
            }
            for served, seed in TEACHERS
        ],
        "method": method,
        "train": {"epochs": 3, "lr": 0.05},
        "output_dir": str(tmp_path / "runs"),
        **extra,
    }


KD = {"name": "kd", "student": {"arch": "cifar_resnet8"}}
# Redis reads that wait out a busy machine. The 0.25 s default can run out while both cores are taken, and
# the client's guard then sends that batch to the service (which answers it from its own read of the
# cache): a degraded read, right for a user, but these tests count every hit.
PATIENT_READS = "socket_timeout=5"
EKD_METHOD = {"name": "ekd", "depth": 8}


def serve_teachers(tmp_path: Path, cache_uri: str) -> tuple[BackgroundServer, LocalBackend]:
    engines = {
        served: TeacherEngine(create_teacher("cifar_resnet20", 10, checkpoint=tmp_path / f"{served}.pt"))
        for served, _ in TEACHERS
    }
    backend = LocalBackend(engines)
    return BackgroundServer(backend, store=open_store(cache_uri)), backend


@pytest.fixture(params=["lmdb", "redis"])
def cache_uri(request, tmp_path):
    if request.param == "lmdb":
        return f"lmdb://{tmp_path / 'cache'}"
    base = request.getfixturevalue("redis_url")
    database = abs(hash(str(tmp_path))) % 15 + 1  # a database of this test's own
    return base[: base.rindex("/")] + f"/{database}?{PATIENT_READS}"


@pytest.fixture(scope="module")
def trained_in_process(tmp_path_factory) -> tuple[Path, ExperimentResult]:
    """The kd experiment in process, its teachers trained on the way into the folder returned with it."""
    folder = tmp_path_factory.mktemp("in-process")
    return folder, run_experiment(ExperimentConfig.model_validate(experiment(folder, "kd-in-process", KD)))


def test_served_teachers_match_in_process_and_are_reused_across_experiments(
    tmp_path, cache_uri, trained_in_process
):
    folder, in_process = trained_in_process
    for checkpoint in folder.glob("t?.pt*"):  # the same teachers, served
        shutil.copy(checkpoint, tmp_path / checkpoint.name)

    server, _ = serve_teachers(tmp_path, cache_uri)
    with server:
        served_cfg = experiment(
            tmp_path,
            "kd-served",
            KD,
            teacher_source={"kind": "served", "address": server.address, "cache": cache_uri},
        )
        served = run_experiment(ExperimentConfig.model_validate(served_cfg))
    # Same seed, same data, same replayed views; the served targets are fp16 instead of fp32, which moves a
    # few of 360 test predictions at most on a 3-epoch student: 5 points is far outside that, far inside
    # chance.
    assert abs(served.test_accuracy - in_process.test_accuracy) <= 0.05
    assert served.test_accuracy > 0.2  # twice chance: the student learned from the served targets
    assert served.counters["teacher_calls"] > 0 and served.counters["cache_misses"] > 0

    # Restart: a new service on the same cache, and a different experiment (ekd) in another process.
    server, backend = serve_teachers(tmp_path, cache_uri)
    with server:
        calls_at_start = backend.teacher_calls()
        config = tmp_path / "ekd.yaml"
        config.write_text(yaml.safe_dump(experiment(tmp_path, "ekd-served", EKD_METHOD)))
        env = {**os.environ, "EKD_CACHE_URI": cache_uri}
        run = subprocess.run(
            [EKD, "distill", str(config), "--teacher-service", server.address, "--no-tracking"],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
            cwd=tmp_path,
        )
        assert run.returncode == 0, run.stderr
        assert backend.teacher_calls() == calls_at_start  # no forward pass: every output came from the cache
    record = json.loads((tmp_path / "runs" / "ekd-served" / "results.json").read_text())[0]
    assert record["counters"]["teacher_calls"] == 0
    assert record["counters"]["cache_misses"] == 0 and record["counters"]["cache_hits"] > 0
    assert record["test_accuracy"] > 0.2


def save_random_teachers(tmp_path: Path) -> None:
    """Checkpoints of the TEACHERS with random weights (their seeds), for tests of plumbing, not accuracy."""
    preprocessing = Preprocessing(input_size=8, mean=(0.5,) * 3, std=(0.25,) * 3)
    for served, seed in TEACHERS:
        torch.manual_seed(seed)
        model = create_teacher("cifar_resnet20", 10).model
        save_teacher_checkpoint(tmp_path / f"{served}.pt", model, "cifar_resnet20", 10, preprocessing)


class StopAfterEpoch(Exception):
    """Ends a run after an epoch, as a killed process would."""


def test_a_resumed_run_reports_the_counters_of_an_uninterrupted_one(tmp_path):
    save_random_teachers(tmp_path)
    saved = tmp_path / "training_state.pt"
    runs = {}
    for name in ("whole", "stopped"):
        # Each run with a cache of its own, so that both start cold.
        cache_uri = f"lmdb://{tmp_path / name / 'cache'}"
        source = {"kind": "served", "cache": cache_uri}
        server, _ = serve_teachers(tmp_path, cache_uri)
        with server:
            source["address"] = server.address
            cfg = ExperimentConfig.model_validate(experiment(tmp_path, name, KD, teacher_source=source))
            if name == "whole":
                runs[name] = run_experiment(cfg)
                continue
            stopped = ExperimentSession(cfg, splits=load_splits(cfg), device=torch.device("cpu"), started=0)

            def stop_after_first_epoch(row: dict, session: ExperimentSession = stopped) -> None:
                torch.save(session.training_state(), saved)
                raise StopAfterEpoch

            with pytest.raises(StopAfterEpoch):
                stopped.fit(on_epoch_end=stop_after_first_epoch)
            stopped.source.close()
            # A new process would make a new session, with a new source whose counters start at zero.
            resumed = ExperimentSession(
                cfg, splits=load_splits(cfg), device=torch.device("cpu"), started=time.time()
            )
            resumed.fit(resume=torch.load(saved, weights_only=True))
            runs[name] = resumed.finish()
    whole, stopped_run = runs["whole"], runs["stopped"]
    assert whole.counters["teacher_calls"] > 0 and whole.counters["cache_hits"] > 0  # epoch 2 replays views
    assert stopped_run.counters == {**whole.counters, "resumes": 1}
    assert [row["epoch"] for row in stopped_run.history] == [0, 1, 2]
    assert stopped_run.test_accuracy == whole.test_accuracy


PASSWORD = "s3cret-pw"


def test_a_cache_password_never_shows_in_output_or_results(tmp_path, start_redis_server):
    save_random_teachers(tmp_path)
    server_url = start_redis_server().url
    redis.Redis.from_url(server_url).config_set("requirepass", PASSWORD)
    cache_uri = server_url.replace("redis://", f"redis://:{PASSWORD}@")
    server, _ = serve_teachers(tmp_path, cache_uri)
    config = tmp_path / "kd.yaml"
    # The password comes from the environment, as it would in a deployment.
    config.write_text(
        yaml.safe_dump(
            experiment(
                tmp_path,
                "kd-secret",
                KD,
                teacher_source={"cache": cache_uri.replace(PASSWORD, "${CACHE_PASSWORD}")},
            )
        )
    )
    with server:
        run = subprocess.run(
            [
                EKD,
                "-v",
                "distill",
                str(config),
                "--teacher-service",
                server.address,
                "--set",
                "train.epochs=1",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "CACHE_PASSWORD": PASSWORD},
            cwd=tmp_path,
        )
    assert run.returncode == 0, run.stderr
    assert PASSWORD not in run.stdout + run.stderr
    written = [path for path in (tmp_path / "runs").rglob("*") if path.is_file()]
    assert any(path.name == "results.json" for path in written)
    for path in written:
        assert PASSWORD.encode() not in path.read_bytes(), path
    record = json.loads((tmp_path / "runs" / "kd-secret" / "results.json").read_text())[0]
    assert record["config"]["teacher_source"]["cache"] == cache_uri.replace(PASSWORD, "***")
    assert record["counters"]["cache_misses"] > 0  # the run did use the cache, password and all


def test_compact_soft_labels_from_the_service_train_exactly_as_in_process(tmp_path):
    """The service compresses the float32 logits as the trainer does in process: the same frames, so the same
    training, to the last loss digit; and it caches them, so a second run makes no forward pass."""
    compact = {"soft_labels": "compact"}
    in_process = run_experiment(
        ExperimentConfig.model_validate(experiment(tmp_path, "kd-compact", KD, teacher_source=compact))
    )
    cache_uri = f"lmdb://{tmp_path / 'cache'}"
    server, backend = serve_teachers(tmp_path, cache_uri)
    with server:
        source = {"kind": "served", "address": server.address, "cache": cache_uri, **compact}
        served = run_experiment(
            ExperimentConfig.model_validate(
                experiment(tmp_path, "kd-compact-served", KD, teacher_source=source)
            )
        )
        server.running.servicer.wait_for_cache_writes()
        calls = backend.teacher_calls()
        again = run_experiment(
            ExperimentConfig.model_validate(
                experiment(tmp_path, "kd-compact-again", KD, teacher_source=source)
            )
        )
        assert backend.teacher_calls() == calls
    assert [row["loss"] for row in served.history] == [row["loss"] for row in in_process.history]
    assert served.test_accuracy == in_process.test_accuracy == again.test_accuracy
    assert again.counters["teacher_calls"] == 0 and again.counters["cache_misses"] == 0
