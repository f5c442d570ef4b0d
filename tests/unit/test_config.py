"""The experiment schema: shipped configs validate; every bad field is named with what is allowed."""

from pathlib import Path

import pytest

from services.errors import ConfigError
from trainer.config import ExperimentConfig, load_experiment

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs" / "digits").glob("*.yaml"))
KD = """
name: t
teachers: [{name: cifar_resnet20, checkpoint: c.pt}]
method: {name: kd, temperature: 4.0}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_every_shipped_digits_config_validates():
    names = {p.stem for p in SHIPPED}
    assert {
        "kd",
        "kd_ensemble",
        "student_ensemble",
        "ekd",
        "one",
        "okd",
        "feed_parallel",
        "feed_sequential",
    } <= names
    for path in SHIPPED:
        cfg = load_experiment(path)
        assert cfg.data.dataset == "digits"


def test_valid_minimal_config_gets_defaults(tmp_path):
    cfg = load_experiment(write(tmp_path, KD))
    assert cfg.method.name == "kd" and cfg.method.alpha == 0.5
    assert cfg.data.batch_size == 64 and cfg.train.schedule == "cosine"


@pytest.mark.parametrize(
    "text, field, hint",
    [
        (KD.replace("temperature: 4.0", "temperature: -1"), "method.kd.temperature", "greater than 0"),
        (KD.replace("name: kd,", "name: kdd,"), "method", "'kd'"),
        (KD.replace("cifar_resnet20", "resnet9000"), "teachers.0.name", "cifar_resnet110"),
        (KD + "data: {batch_size: 64, colour: red}\n", "data.colour", "Extra inputs are not permitted"),
        (KD + "data: {dataset: mnist}\n", "data.dataset", "'digits'"),
        (KD + "train: {schedule: linear}\n", "train.schedule", "'cosine'"),
        (KD + "train: {milestones: [0.8, 0.2]}\n", "train.milestones", "increasing fractions"),
    ],
)
def test_bad_field_is_named_with_what_is_allowed(tmp_path, text, field, hint):
    with pytest.raises(ConfigError) as err:
        load_experiment(write(tmp_path, text))
    message = str(err.value)
    assert field in message and hint in message


def test_method_and_teachers_must_fit(tmp_path):
    with pytest.raises(ConfigError, match="list at least one under `teachers`"):
        load_experiment(write(tmp_path, "name: t\nmethod: {name: kd}\n"))
    with pytest.raises(ConfigError, match="uses no external teacher"):
        load_experiment(write(tmp_path, KD.replace("name: kd, temperature: 4.0", "name: one")))


def test_unreadable_files_get_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_experiment(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(write(tmp_path, "name: [unclosed"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_experiment(write(tmp_path, "- just\n- a list\n"))


EXPERIMENTS = sorted((REPO / "configs" / "digits").glob("*.yaml")) + sorted(
    (REPO / "configs" / "imagenet").glob("*.yaml")
)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_every_shipped_experiment_validates_and_survives_its_own_dump(path):
    # Ray Train workers and exported students rebuild configs from their JSON dumps.
    cfg = load_experiment(path)
    assert ExperimentConfig.model_validate(cfg.model_dump(mode="json")) == cfg
