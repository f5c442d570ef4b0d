"""Training from the bank alone (`teacher_source.kind: bank`): the seed-000 recipe's shape on a generated
ImageNet-layout folder (the recipes' test data, at 32×32 with small teachers) trains with no teacher service
running, exactly as the served run that filled the bank (LMDB and a real redis-server, full and compact
forms); a miss is one line naming the `ekd warm` command that fills the bank, and that command does
(a real Ray Data job); `on_miss: compute` fills the misses in process."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_imagenet_recipes import recipe

from services.cache import FORMS, open_store
from services.core.contract import LOGITS
from services.core.errors import ConfigError
from services.formats.soft_labels import CompactLogits
from services.rpc.backends import LocalBackend
from services.rpc.server import BackgroundServer
from services.teachers.engine import TeacherEngine
from services.teachers.zoo import create_teacher
from trainer.config import ExperimentConfig, TeacherSourceConfig
from trainer.methods.base import TeacherOutputs, in_soft_label_form
from trainer.runs.experiment import ExperimentResult, ensure_teachers
from trainer.runs.inputs import load_splits
from trainer.runs.run import run_experiment
from trainer.runs.sources import BankMissError, BankTeacherSource

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("bank_source")]

EKD = str(Path(sys.executable).parent / "ekd")
# Half the training images, one replayed view, one epoch, decoded in the training process: every run asks for
# the same hundred views.
SMALL = ["data.train_fraction=0.5", "data.views=1", "data.workers=0", "train.epochs=1"]
# The recipe of each form: seed 000's ensemble KD (logits), FEED with its logit term (layer4 maps and logits).
RECIPES = {"full": ("seed000_ensemble_kd", []), "compact": ("feed", ["method.kd_weight=1.0"])}


@pytest.fixture(scope="module")
def work(image_folder, tmp_path_factory) -> Path:
    """A folder with the recipes' two small teachers trained once (every recipe here names the same ones)."""
    work = tmp_path_factory.mktemp("bank")
    cfg = recipe("seed000_ensemble_kd", image_folder, work, SMALL)
    ensure_teachers(cfg, load_splits(cfg), torch.device("cpu"))
    return work


def with_source(cfg: ExperimentConfig, name: str, **source) -> ExperimentConfig:
    return cfg.model_copy(
        update={"name": name, "teacher_source": cfg.teacher_source.model_copy(update=source)}
    )


def assert_same_training(run: ExperimentResult, reference: ExperimentResult) -> None:
    """The same losses epoch by epoch (every term), the same student and the same teacher evaluation."""

    def trained(history: list[dict[str, float]]) -> list[dict[str, float]]:
        return [{k: v for k, v in row.items() if k != "stall_seconds"} for row in history]  # but the clock

    assert trained(run.history) == trained(reference.history)
    assert run.test_accuracy == reference.test_accuracy
    assert [t.test_accuracy for t in run.teachers] == [t.test_accuracy for t in reference.teachers]
    assert [t.params for t in run.teachers] == [t.params for t in reference.teachers]


def served_run(cfg: ExperimentConfig, bank: str) -> ExperimentResult:
    """`cfg` from a teacher service (real gRPC over 127.0.0.1) that writes what it computes to `bank`."""
    splits = load_splits(cfg)
    engines = {
        teacher.served_as: TeacherEngine(create_teacher(teacher.name, splits.num_classes, teacher.checkpoint))
        for teacher in cfg.teachers
    }
    with BackgroundServer(LocalBackend(engines), store=open_store(bank)) as server:
        return run_experiment(
            with_source(cfg, f"{cfg.name}-served", kind="served", address=server.address, cache=bank)
        )


def trained_views(cfg: ExperimentConfig, result: ExperimentResult) -> int:
    """(teacher, view) pairs a run trains from: every readable training view of each teacher (FEED's parallel
    mode trains from both at once); the counters are taken before the teachers' evaluation."""
    readable = len(load_splits(cfg).train) - result.history[-1]["skipped_images"]
    return len(cfg.teachers) * int(readable)


def test_a_bank_run_trains_as_the_served_run_that_filled_the_bank(work, image_folder, tmp_path):
    name, extra = RECIPES["full"]
    cfg = recipe(name, image_folder, work, [*SMALL, *extra])
    bank = f"lmdb://{tmp_path / 'bank'}"
    served = served_run(cfg, bank)  # the bank is empty: the service computes every output and writes it
    assert served.counters["teacher_calls"] > 0

    banked = run_experiment(with_source(cfg, f"{name}-bank", kind="bank", cache=bank))
    assert_same_training(banked, served)
    assert banked.counters["teacher_calls"] == 0 and banked.counters["cache_misses"] == 0
    assert banked.counters["cache_hits"] == trained_views(cfg, banked)


def test_on_miss_compute_fills_a_compact_redis_bank_that_trains_bank_and_served_runs_alike(
    work, image_folder, tmp_path, start_redis_server
):
    name, extra = RECIPES["compact"]
    cfg = recipe(name, image_folder, work, [*SMALL, *extra, "teacher_source.soft_labels=compact"])
    bank = start_redis_server().url
    filling = run_experiment(with_source(cfg, f"{name}-fills", kind="bank", cache=bank, on_miss="compute"))
    assert filling.counters["teacher_calls"] > 0
    assert filling.counters["cache_misses"] == trained_views(cfg, filling)
    assert filling.counters["cache_hits"] == 0

    banked = run_experiment(with_source(cfg, f"{name}-bank", kind="bank", cache=bank))
    assert banked.counters["teacher_calls"] == 0 and banked.counters["cache_misses"] == 0
    assert banked.counters["cache_hits"] == trained_views(cfg, banked)
    assert_same_training(banked, filling)
    served = served_run(cfg, bank)
    assert served.counters["teacher_calls"] == 0
    assert_same_training(banked, served)


def distill(config: Path, *options: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [EKD, "distill", str(config), *options, "--no-tracking"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=cwd,
    )


def test_a_miss_is_one_line_naming_the_warm_command_that_fills_the_bank(
    work, image_folder, tmp_path, ray_cluster_env
):
    cfg = recipe("seed000_ensemble_kd", image_folder, work, SMALL)
    cfg = with_source(cfg, "seed000-bank", kind="bank", cache=f"lmdb://{tmp_path / 'bank'}")
    config = tmp_path / "seed000-bank.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    # A --set option shapes the views, so the command that fills the bank must carry it.
    overrides = ["--set", "data.replay_seed=7"]

    missed = distill(config, *overrides, cwd=tmp_path)
    assert missed.returncode == 2, missed.stderr
    # The error is one line, the last (log lines of the run's start may come before it).
    error = missed.stderr.strip().splitlines()[-1]
    assert error.startswith("error: the bank ") and missed.stderr.count("error:") == 1, missed.stderr
    assert re.search(r"lacks (\d+) of the \1 views of a batch", error), error  # a cold bank: all of them
    command = f"ekd warm {config} --set data.replay_seed=7"
    assert f"fill it with: {command};" in error

    warm = subprocess.run(
        [EKD, *shlex.split(command)[1:]],
        capture_output=True,
        text=True,
        timeout=600,
        env=ray_cluster_env,
        cwd=tmp_path,
    )
    assert warm.returncode == 0, warm.stderr
    trained = distill(config, *overrides, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    record = json.loads((Path(cfg.output_dir) / cfg.name / "results.json").read_text())[0]
    assert record["counters"]["teacher_calls"] == 0 and record["counters"]["cache_misses"] == 0


def test_a_bank_source_needs_the_bank_and_the_teachers_checkpoints(work, image_folder, tmp_path):
    with pytest.raises(ValueError, match="kind 'bank' needs `cache`"):
        TeacherSourceConfig(kind="bank")
    cfg = recipe(
        "seed000_ensemble_kd", image_folder, work, [*SMALL, f"teachers.1.checkpoint={tmp_path / 'none.pt'}"]
    )
    with pytest.raises(ConfigError, match=r"teachers\.1\.checkpoint: no file at .*sha256"):
        run_experiment(with_source(cfg, "no-checkpoint", kind="bank", cache=f"lmdb://{tmp_path / 'bank'}"))


def as_trained(outputs: TeacherOutputs, form: str) -> list[torch.Tensor]:
    """What the training loop makes of a source's outputs in `form`, as plain tensors to compare."""
    shaped = in_soft_label_form(outputs, form)
    tensors = [*shaped.features[0].values()]
    for logits in shaped.logits:
        parts = (
            (logits.top, logits.indices, logits.gaps, logits.tail)
            if isinstance(logits, CompactLogits)
            else (logits,)
        )
        tensors += [part for part in parts if part is not None]
    return tensors


@pytest.mark.parametrize("form", FORMS)
def test_every_form_computed_on_a_miss_trains_as_read_back_from_the_bank(form, engines, tmp_path):
    checkpoint = engines["a"].spec.checkpoint
    bank = f"lmdb://{tmp_path / 'bank'}"
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    wanted = [[LOGITS, "layer3"]]

    def source(**options) -> BankTeacherSource:
        return BankTeacherSource(
            [create_teacher("cifar_resnet20", 10, checkpoint=checkpoint)], bank, **options
        )

    filling = source(compute_misses=True)
    computed = filling.fetch(images[:4], wanted, logits_form=form)
    assert filling.counters() == {"teacher_calls": 1, "cache_hits": 0, "cache_misses": 4}
    filling.close()

    reading = source()
    read = reading.fetch(images[:4], wanted, logits_form=form)
    assert reading.counters() == {"teacher_calls": 0, "cache_hits": 4, "cache_misses": 0}
    for got, expected in zip(as_trained(read, form), as_trained(computed, form), strict=True):
        assert torch.equal(got, expected)
    with pytest.raises(
        BankMissError, match=r"lacks 2 of the 6 views of a batch \(teachers\.0 cifar_resnet20: "
    ):
        reading.fetch(images, wanted, logits_form=form)
    reading.close()
