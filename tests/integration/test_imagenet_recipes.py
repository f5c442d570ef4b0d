"""Every ImageNet recipe (configs/imagenet/) end to end on a generated ImageFolder of real JPEG files: at
32×32 with small teachers and students (`--set`-style overrides), in process and from served teachers (real
gRPC over 127.0.0.1, an LMDB cache), through exported students that load back and reproduce their
accuracy."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from services.cache import open_store
from services.rpc.backends import LocalBackend
from services.rpc.server import BackgroundServer
from services.teachers.engine import TeacherEngine
from services.teachers.zoo import create_teacher
from trainer.config import ExperimentConfig, load_experiment
from trainer.runs.experiment import ensure_teachers
from trainer.runs.export import load_student
from trainer.runs.inputs import load_splits
from trainer.runs.loop import EVAL_BATCH_SIZE, eval_loader, readable_batches
from trainer.runs.run import run_experiment

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "imagenet"
SMALL_STUDENTS = {  # the recipe's student, made small enough for 2 CPU cores (None: the recipe's own)
    "seed000_ensemble_kd": [
        "method.student.options.prune_ratio=0.5",
        "method.student.options.source_checkpoint=null",
    ],
    "meal_v2": ["method.student.arch=timm:resnet10t"],
    "ekd": ["method.arch=resnet18"],
    "one": [],
    "okd": ["method.arch=resnet18"],
    "feed": ["method.student.arch=timm:resnet10t"],
}


DECODED_IN_WORKERS = "seed000_ensemble_kd"


def recipe(name: str, image_folder: Path, work: Path, extra: list[str] = ()) -> ExperimentConfig:
    """The recipe with the dataset, sizes and teachers of this machine; teachers ekd trains itself (the
    registered ones become torchvision resnet18s, the timm ones timm resnet10ts), one epoch each."""
    path = RECIPES / f"{name}.yaml"
    overrides = [
        f"data.root={image_folder}",
        "data.image_size=32",
        "data.views=2",
        "data.batch_size=32",
        "data.val_fraction=0.1",
        # Decoding processes in the one recipe that stands for the others (they start anew each epoch, from
        # a forkserver: seconds each on this machine); in process elsewhere.
        f"data.workers={2 if name == DECODED_IN_WORKERS else 0}",
        "data.skip_unreadable=true",
        "train.epochs=1",
        "train.warmup_epochs=0",
        "device=cpu",
        f"output_dir={work / 'runs'}",
        *SMALL_STUDENTS[name],
    ]
    for index, teacher in enumerate(load_experiment(path).teachers):
        small = "timm:resnet10t" if teacher.name.startswith("timm:") else "resnet18"
        overrides += [
            f"teachers.{index}.name={small}",
            f"teachers.{index}.checkpoint={work / f'teacher{index}.pt'}",
            f"teachers.{index}.served_as=teacher{index}",
            f"teachers.{index}.train_if_missing=true",
            f"teachers.{index}.seed={index}",
            f"teachers.{index}.train.epochs=1",
        ]
    if name == "meal_v2":  # start the student from a file in timm's layout over 1000 classes
        weights = work / "resnet10t.safetensors"
        safetensors.torch.save_file(timm.create_model("resnet10t").state_dict(), weights)
        overrides.append(f"method.student.init_checkpoint={weights}")
    return load_experiment(path, [*overrides, *extra])


def assert_exports_reproduce_their_accuracy(cfg: ExperimentConfig, result) -> None:
    splits = load_splits(cfg)
    assert result.students, "a recipe exports at least one student"
    for exported in result.students:
        loaded = load_student(exported.path)
        assert loaded.exported.image_size == 32
        correct = total = 0
        for (images, labels, *_), _ in readable_batches(eval_loader(splits.test, EVAL_BATCH_SIZE)):
            correct += (loaded.predict(images).argmax(1) == labels).sum().item()
            total += labels.shape[0]
        assert correct / total == exported.test_accuracy, exported.name


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL_STUDENTS))
def test_recipe_runs_in_process(name, image_folder, tmp_path):
    cfg = recipe(name, image_folder, tmp_path)
    assert cfg.data.dataset == "imagenet" and cfg.data.image_size == 32
    result = run_experiment(cfg)
    assert 0.0 <= result.test_accuracy <= 1.0 and result.history[-1]["skipped_images"] == 1
    assert_exports_reproduce_their_accuracy(cfg, result)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", [name for name in sorted(SMALL_STUDENTS) if load_experiment(RECIPES / f"{name}.yaml").teachers]
)
def test_recipe_runs_on_served_teachers_and_replays_from_the_cache(name, image_folder, tmp_path):
    # One replayed view, two epochs: the second epoch asks for exactly the views of the first.
    cfg = recipe(name, image_folder, tmp_path, ["data.views=1", "train.epochs=2"])
    splits = load_splits(cfg)
    ensure_teachers(cfg, splits, torch.device("cpu"))
    engines = {
        teacher.served_as: TeacherEngine(create_teacher(teacher.name, splits.num_classes, teacher.checkpoint))
        for teacher in cfg.teachers
    }
    cache = f"lmdb://{tmp_path / 'cache'}"
    with BackgroundServer(LocalBackend(engines), store=open_store(cache)) as server:
        served = cfg.model_copy(
            update={
                "teacher_source": cfg.teacher_source.model_copy(
                    update={"kind": "served", "address": server.address, "cache": cache}
                )
            }
        )
        result = run_experiment(served)
    assert [row["skipped_images"] for row in result.history] == [1, 1]  # the truncated file, each epoch
    views_per_epoch = len(splits.train) - 1
    # Epoch 0 computed every (teacher, view); epoch 1 found every one of them in the cache.
    assert result.counters["cache_hits"] >= views_per_epoch * len(cfg.teachers)
    assert_exports_reproduce_their_accuracy(served, result)
