"""The experiment schema: shipped configs validate; every bad field is named with what is allowed."""

import json
from pathlib import Path

import pytest

from services.core.errors import ConfigError
from trainer.config import ExperimentConfig, load_experiment

REPO = Path(__file__).resolve().parents[2]
# The experiments (the sweep_*.yaml beside them are sweeps: tests/unit/test_sweep_spec.py expands them).
SHIPPED = sorted(p for p in (REPO / "configs" / "digits").glob("*.yaml") if not p.stem.startswith("sweep"))
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
        (
            KD + "teacher_source: {outage_wait_seconds: -1}\n",
            "teacher_source.outage_wait_seconds",
            "greater than or equal to 0",
        ),
        (
            KD + "teacher_source: {outage_backoff_max_seconds: 0}\n",
            "teacher_source.outage_backoff_max_seconds",
            "greater than 0",
        ),
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


EXPERIMENTS = SHIPPED + sorted((REPO / "configs" / "imagenet").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_every_shipped_experiment_validates_and_survives_its_own_dump(path):
    # Ray Train workers and exported students rebuild configs from their JSON dumps.
    cfg = load_experiment(path)
    assert ExperimentConfig.model_validate(cfg.model_dump(mode="json")) == cfg


@pytest.mark.parametrize(
    "name, why",
    [
        ("../../x", "single path component"),
        ("a/b", "single path component"),
        ("/abs/path", "single path component"),
        ("a\\b", "single path component"),
        (".", "must be a file name"),
        ("..", "must be a file name"),
        ("", "must be a file name"),
        ("nul\0byte", "NUL"),
        ("é" * 128, "at most 255 bytes"),  # 256 bytes in UTF-8
    ],
)
def test_experiment_names_are_single_path_components(tmp_path, name, why):
    with pytest.raises(ConfigError) as err:
        load_experiment(write(tmp_path, KD), [f"name={json.dumps(name)}"])
    message = str(err.value)
    assert "\n  name: " in message and why in message


def test_a_name_at_the_limit_is_accepted(tmp_path):
    assert load_experiment(write(tmp_path, KD), ["name=" + "x" * 255]).name == "x" * 255
    assert (
        load_experiment(write(tmp_path, KD), ["name=kd-ensemble.v2_seed 0"]).name == "kd-ensemble.v2_seed 0"
    )


def test_outage_wait_defaults_to_minutes(tmp_path):
    source = load_experiment(write(tmp_path, KD)).teacher_source
    assert source.outage_wait_seconds >= 300 and 0 < source.outage_backoff_max_seconds <= 60


def test_what_is_shown_of_a_config_carries_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("CACHE_PASSWORD", "pa55")
    text = (
        KD
        + "teacher_source: {kind: served, address: 'user:tok@teachers:50051', cache: 'rediss://:${CACHE_PASSWORD}@r:6380/0'}\n"
    )
    cfg = load_experiment(write(tmp_path, text))
    assert cfg.teacher_source.cache == "rediss://:pa55@r:6380/0"  # what the run connects with
    shown = cfg.shown_json()
    assert shown["teacher_source"]["cache"] == "rediss://:***@r:6380/0"
    assert shown["teacher_source"]["address"] == "***@teachers:50051"
    assert "pa55" not in json.dumps(shown) and "tok" not in json.dumps(shown)
    assert ExperimentConfig.model_validate(shown).name == "t"  # a record's config still loads back
    plain = load_experiment(
        write(tmp_path, KD + "teacher_source: {kind: served, address: '127.0.0.1:50051'}\n")
    )
    assert plain.shown_json() == plain.model_dump(mode="json")
