"""The ray_train backend on a real local Ray: 2 CPU workers, DDP over gloo, per-epoch checkpoints, a worker
killed mid-run and resumed (with the teacher counters of an uninterrupted run), and a local backend that never
imports Ray.

The module joins the test worker's Ray cluster; each run below starts its own worker groups. Two runs of one
kd config serve every test: local, and ray_train with a worker killed at the start of its last epoch. A
resumed run replays the steps of an uninterrupted one from the checkpointed state, so the killed run also
stands for an uninterrupted one where both would end alike (an uninterrupted run beside a killed one, compared
loss by loss: test_node_loss.py). The runs are tiny: scikit-learn's digits at 8×8, a cifar_resnet8 student,
3 epochs of 10 steps of batch 128.
"""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from trainer.config import ExperimentConfig
from trainer.data import ImageTensorDataset, PadCrop, ReplayedViews
from trainer.runs.experiment import TRAINING_STATE_FORMAT, ExperimentResult
from trainer.runs.export import load_student
from trainer.runs.loop import Shard, train_loader
from trainer.runs.ray_train import FAIL_AT_EPOCH_ENV, FAIL_MARKER_ENV, TRAINING_STATE_FILE, run_on_ray_train
from trainer.runs.run import run_experiment

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("ray_train")]

EPOCHS = 3
CHANCE = 0.1  # ten digit classes
# The ray_train backend steps on exactly the local backend's batches (each worker takes half of every batch,
# DDP averages the gradients), so its runs differ from local ones only by batch-norm statistics taken over
# half-batches and the rounding of averaged gradients: a few test images out of 360 (1 image = 0.28 points;
# 3-4 images when measured), in a training whose accuracy still climbs 5-30 points per epoch. A resumed run
# replays the same steps from the checkpointed state. 0.1 is well outside that noise, and well inside the gap
# between a trained student (about 0.55 here after 3 epochs) and chance.
ACCURACY_TOLERANCE = 0.1


def experiment(
    tmp_path: Path, name: str, *, backend: str, method: str = "ce", teacher_checkpoint: Path | None = None
) -> ExperimentConfig:
    teachers = []
    if teacher_checkpoint is not None:
        teachers = [
            {
                "name": "cifar_resnet20",
                "checkpoint": str(teacher_checkpoint),
                "train": {"epochs": 1, "lr": 0.05},
            }
        ]
    return ExperimentConfig.model_validate(
        {
            "name": name,
            "seed": 0,
            "device": "cpu",
            "data": {"dataset": "digits", "image_size": 8, "views": 2, "pad": 1, "batch_size": 128},
            "teachers": teachers,
            "method": {"name": method, "student": {"arch": "cifar_resnet8"}},
            "train": {"epochs": EPOCHS, "lr": 0.1},
            "execution": {
                "backend": backend,
                "workers": 2,
                "max_failures": 1,
                "storage_path": str(tmp_path / "ray" / name),
            },
            "output_dir": str(tmp_path / "runs"),
        }
    )


class KdRuns(NamedTuple):
    local: ExperimentResult
    killed: ExperimentResult
    killed_log: str
    killed_storage: Path
    failure_marker: Path


@pytest.fixture(scope="module")
def kd_runs(joined_ray, tmp_path_factory) -> KdRuns:
    """The same kd experiment on the local backend (which trains the teacher) and on ray_train with its last
    worker dying at the start of epoch 2; the teacher runs in each worker."""
    tmp_path = tmp_path_factory.mktemp("kd")
    marker = tmp_path / "failed-once"
    teacher = tmp_path / "teachers" / "cifar_resnet20.pt"

    def kd(name: str, backend: str) -> ExperimentConfig:
        return experiment(tmp_path, name, backend=backend, method="kd", teacher_checkpoint=teacher)

    local = run_experiment(kd("kd-local", "local"))
    killed = kd("kd-ray", "ray_train")
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    trainer_logger = logging.getLogger("trainer")
    trainer_logger.addHandler(handler)
    level = trainer_logger.level
    trainer_logger.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv(FAIL_AT_EPOCH_ENV, "2")
            env.setenv(FAIL_MARKER_ENV, str(marker))
            killed_result = run_experiment(killed)  # the driver's log lines, captured
    finally:
        trainer_logger.removeHandler(handler)
        trainer_logger.setLevel(level)
    return KdRuns(local, killed_result, log.getvalue(), Path(killed.execution.storage_path), marker)


def test_shards_of_two_workers_make_up_the_single_process_batches():
    images = torch.zeros(301, 3, 2, 2, dtype=torch.uint8)
    views = ReplayedViews(
        ImageTensorDataset(images, torch.zeros(301)), seed=0, views=0, maker=PadCrop(0, False)
    )
    for epoch in (0, 1):
        single = [ids for _, _, ids, *_ in train_loader(views, 64, 3, epoch)]
        shards = [
            [ids for _, _, ids, *_ in train_loader(views, 64, 3, epoch, Shard(rank, 2))] for rank in (0, 1)
        ]
        assert len(shards[0]) == len(shards[1]) == len(single) == 5
        for step, batch in enumerate(single):
            # 301 samples: the last step pads worker 1 with the permutation's first sample, as
            # DistributedSampler does, so that both workers take the same number of steps.
            padding = [single[0][0].item()] if step == len(single) - 1 else []
            together = torch.cat([shards[0][step], shards[1][step]]).tolist()
            assert sorted(together) == sorted(batch.tolist() + padding)


def test_ray_train_kd_matches_local_backend(kd_runs):
    local, distributed = kd_runs.local, kd_runs.killed
    assert "ray_train: 2 workers" in kd_runs.killed_log
    assert "training it" not in kd_runs.killed_log  # the teacher the local run trained, reused

    assert local.test_accuracy > CHANCE + 0.3 and distributed.test_accuracy > CHANCE + 0.3
    assert abs(distributed.test_accuracy - local.test_accuracy) <= ACCURACY_TOLERANCE
    assert [(row["stage"], row["epoch"]) for row in distributed.history] == [(0, e) for e in range(EPOCHS)]
    assert distributed.teachers[0].name == "cifar_resnet20"
    # Worker 0 exported the student and wrote the record where the local backend does.
    run_dir = Path(distributed.run_dir)
    assert run_dir == Path(local.run_dir).parent / "kd-ray"
    loaded = load_student(run_dir / "students" / "seed0" / "student.pt")  # weights_only, from plain data
    assert loaded.predict(torch.zeros(2, 3, 8, 8, dtype=torch.uint8)).shape == (2, 10)
    assert (run_dir / "results_seed0.json").is_file()


@pytest.mark.faults
def test_killed_worker_resumes_from_the_last_epoch_checkpoint(kd_runs):
    assert kd_runs.failure_marker.is_file()  # the injected failure happened
    # Epochs 0 and 1 ran before the failure and came back from the checkpoint; 2 ran after the resume.
    killed = kd_runs.killed
    assert [(row["epoch"], row["resumes"]) for row in killed.history] == [(0, 0), (1, 0), (2, 1)]
    # The checkpoint carried the teacher calls of epochs 0 and 1 (both workers'): the totals are those of an
    # uninterrupted run, 2 workers taking 10 steps each per epoch. Calls the dead worker group made for epoch
    # 2 before it died are lost with it, as is their work.
    assert killed.counters["resumes"] == 1
    assert killed.counters["teacher_calls"] == 2 * EPOCHS * 10
    # The local run makes one call a step for whole batches; each worker, one for its half.
    assert killed.counters["teacher_calls"] == 2 * kd_runs.local.counters["teacher_calls"]


def test_epoch_checkpoints_load_with_weights_only(kd_runs):
    paths = sorted(kd_runs.killed_storage.rglob(TRAINING_STATE_FILE))
    assert len(paths) == 2  # CheckpointConfig(num_to_keep=2): the last two epochs
    states = [torch.load(path, map_location="cpu", weights_only=True) for path in paths]
    assert sorted(state["epoch"] for state in states) == [EPOCHS - 2, EPOCHS - 1]
    last = max(states, key=lambda state: state["epoch"])
    assert last["format"] == TRAINING_STATE_FORMAT and last["stage"] == 0
    assert all(isinstance(v, torch.Tensor) for v in last["method"].values())
    assert last["optimizer"]["state"] and last["scheduler"]["last_epoch"] == EPOCHS * 10
    assert [row["epoch"] for row in last["history"]] == list(range(EPOCHS))
    assert last["rng"]["cpu"].dtype == torch.uint8
    assert last["counters"] == {"teacher_calls": kd_runs.killed.counters["teacher_calls"]}


def test_failure_injection_settings_are_checked(tmp_path, monkeypatch):
    cfg = experiment(tmp_path, "bad-injection", backend="ray_train")
    monkeypatch.setenv(FAIL_AT_EPOCH_ENV, "2")
    with pytest.raises(ValueError, match=f"{FAIL_AT_EPOCH_ENV}=2 needs {FAIL_MARKER_ENV}"):
        run_on_ray_train(cfg)
    monkeypatch.setenv(FAIL_MARKER_ENV, str(tmp_path / "marker"))
    monkeypatch.setenv(FAIL_AT_EPOCH_ENV, "0")
    with pytest.raises(ValueError, match=f"{FAIL_AT_EPOCH_ENV} must be an epoch index >= 1.*got '0'"):
        run_on_ray_train(cfg)


def test_ray_train_backend_refuses_a_local_teacher_source(tmp_path):
    cfg = experiment(tmp_path, "with-source", backend="ray_train")
    with pytest.raises(ValueError, match="cannot be handed to backend 'ray_train'"):
        run_experiment(cfg, source=object())


LOCAL_RUN = """
import sys
from trainer.config import ExperimentConfig
from trainer.runs.run import run_experiment
cfg = ExperimentConfig.model_validate({{
    "name": "local", "device": "cpu", "output_dir": {output!r},
    "data": {{"dataset": "digits", "image_size": 8, "views": 0, "batch_size": 128}},
    "method": {{"name": "ce", "student": {{"arch": "cifar_resnet8"}}}}, "train": {{"epochs": 1}}}})
result = run_experiment(cfg)
assert 0.0 <= result.test_accuracy <= 1.0
leaked = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.") or m == "trainer.runs.ray_train")
assert not leaked, leaked
print("no ray")
"""


def test_local_backend_never_imports_ray(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", LOCAL_RUN.format(output=str(tmp_path / "runs"))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "no ray"
