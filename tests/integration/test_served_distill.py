"""Distillation from served teachers: the same accuracy as in-process teachers, and teacher outputs reused
across experiments, processes and service restarts, with LMDB and with Redis (real gRPC over 127.0.0.1, a real
redis-server, real LMDB; the second experiment runs as a separate `ekd distill` process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.backends import LocalBackend
from services.cache import open_store
from services.engine import TeacherEngine
from services.server import BackgroundServer
from services.zoo import create_teacher
from trainer.config import ExperimentConfig
from trainer.run import run_experiment

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
    return base[: base.rindex("/")] + f"/{abs(hash(str(tmp_path))) % 15 + 1}"  # a database of this test's own


def test_served_teachers_match_in_process_and_are_reused_across_experiments(tmp_path, cache_uri):
    in_process = run_experiment(ExperimentConfig.model_validate(experiment(tmp_path, "kd-in-process", KD)))

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
            [EKD, "distill", str(config), "--teacher-service", server.address],
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
