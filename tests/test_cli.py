"""The `ekd` console script as a user runs it: a real process, real files, real exit codes. The first run
tracks to MLflow, as by default; the others pass --no-tracking, which spares each the embedded store's
creation (tracking itself: test_tracking.py)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from services.cache.local_redis import free_port
from trainer.cli.main import app
from trainer.runs.export import load_student

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EKD = str(Path(sys.executable).parent / "ekd")

TINY = """
name: tiny-kd
seed: 0
data: {{dataset: digits, image_size: 8, views: 2, pad: 1, batch_size: 128}}
teachers:
  - {{name: cifar_resnet20, checkpoint: {checkpoint}, train: {{epochs: 2, lr: 0.05}}}}
method: {{name: kd, student: {{arch: cifar_resnet8}}}}
train: {{epochs: 2, lr: 0.05}}
output_dir: {output}
"""


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([EKD, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_distill_trains_missing_teacher_then_reuses_it(tmp_path):
    checkpoint = tmp_path / "teachers" / "r20.pt"
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.format(checkpoint=checkpoint, output=tmp_path / "runs"))

    first = run("distill", str(config), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "no checkpoint at" in first.stderr and "training it" in first.stderr
    assert checkpoint.is_file()
    assert "tiny-kd" in first.stdout and "test accuracy" in first.stdout

    run_dir = tmp_path / "runs" / "tiny-kd"
    results = json.loads((run_dir / "results.json").read_text())
    assert results[0]["method"] == "kd" and 0.0 <= results[0]["test_accuracy"] <= 1.0
    assert results[0]["teachers"][0]["name"] == "cifar_resnet20"
    assert (run_dir / "accuracy_vs_params.png").stat().st_size > 1000
    loaded = load_student(run_dir / "students" / "seed0" / "student.pt")  # weights_only, from plain data
    assert loaded.predict(torch.zeros(2, 3, 8, 8, dtype=torch.uint8)).shape == (2, 10)

    second = run("distill", str(config), "--seeds", "1", "--no-tracking", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "training it" not in second.stderr


def test_limited_data_teachers_baselines_and_exports_that_evaluate_back(tmp_path):
    checkpoint = tmp_path / "teachers" / "r20-half.pt"
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.format(checkpoint=checkpoint, output=tmp_path / "runs"))
    limited = ("--set", "data.train_fraction=0.5", "--set", "data.val_fraction=0", "--no-tracking")

    first = run("distill", str(config), *limited, "--baselines", "--seeds", "0,1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "training it" in first.stderr  # the teacher trains on the experiment's subset
    results = json.loads((tmp_path / "runs" / "tiny-kd" / "results.json").read_text())
    kd = [r for r in results if r["name"] == "tiny-kd"]
    alone = [r for r in results if r["name"] == "tiny-kd-alone-cifar_resnet8"]
    assert [r["seed"] for r in kd] == [0, 1] and [r["seed"] for r in alone] == [0, 1]
    assert kd[0]["students"][0]["alone"] == "tiny-kd-alone-cifar_resnet8" and alone[0]["method"] == "ce"
    assert kd[0]["val_accuracy"] is None and kd[0]["train_samples"] == alone[0]["train_samples"]
    assert kd[0]["teachers"][0]["training_data"]["train_fraction"] == 0.5
    assert "tiny-kd-alone-cifar_resnet8" in first.stdout and " pp (" in first.stdout

    # The same teacher checkpoint for the whole training split is refused: it was trained on the subset.
    full = run("distill", str(config), cwd=tmp_path)
    assert full.returncode == 2
    assert "teachers.0" in full.stderr and "train_fraction 0.5" in full.stderr
    assert "Traceback" not in full.stderr

    evaluated = run("evaluate", str(tmp_path / "runs" / "tiny-kd"), cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    assert evaluated.stdout.count("yes") == 2 and "NO" not in evaluated.stdout  # seeds 0 and 1


def test_user_errors_are_one_line_without_traceback(tmp_path):
    """In process (Typer's runner runs the same command code): each error comes before any work. A config
    error from a real process, its exit status and stderr:
    test_a_bug_keeps_its_traceback_while_a_bad_config_is_one_line."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmethod: {name: kd, temperature: 0}\nteachers: []\n")
    cases = [
        ("distill", str(tmp_path / "missing.yaml")),
        ("distill", str(bad)),
        ("teachers", "train", str(bad)),
    ]
    results = [CliRunner().invoke(app, list(args)) for args in cases]
    for args, result in zip(cases, results, strict=True):
        assert result.exit_code == 2, (args, result.stderr)
        assert result.stderr.startswith("error:") and "Traceback" not in result.stderr and not result.stdout
    assert "method.kd.temperature" in results[1].stderr


def test_a_dead_teacher_service_or_cache_is_a_clear_error(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.format(checkpoint=tmp_path / "r20.pt", output=tmp_path / "runs"))
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    # Waited for (briefly here: minutes by default), saying so, then one line naming the budget.
    wait = (
        "--set",
        "teacher_source.outage_wait_seconds=2",
        "--set",
        "teacher_source.outage_backoff_max_seconds=1",
    )
    result = run("distill", str(config), "--teacher-service", dead, *wait, "--no-tracking", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    said = " ".join(result.stderr.split())  # log lines come wrapped to the terminal's width
    assert f"teacher service at {dead} unreachable (UNAVAILABLE); waiting up to 2 s for it" in said
    assert "(attempt 1 in 1.0 s)" in said
    assert re.search(
        rf"error: teacher service at {dead} unreachable for \d+ s, beyond teacher_source.outage_wait_seconds "
        r"\(2 s\); last error: UNAVAILABLE$",
        result.stderr.strip(),
    )


def test_teachers_train_saves_checkpoints(tmp_path):
    checkpoint = tmp_path / "r20.pt"
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.format(checkpoint=checkpoint, output=tmp_path / "runs"))
    result = run("teachers", "train", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert str(checkpoint) in result.stdout and checkpoint.is_file()
    assert "DEBUG" not in result.stderr  # without -v (test_version_and_verbose)


CE_ONLY = """
name: tiny-ce
seed: 0
data: {{dataset: digits, image_size: 8, views: 2, pad: 1, batch_size: 128}}
method: {{name: ce, student: {{arch: cifar_resnet8}}}}
train: {{epochs: 2, lr: 0.05}}
output_dir: {output}
"""

# A bug in a method (here a ValueError, as a shape mistake would raise) must not pass for a user error. The
# method is plain cross-entropy, which needs no teacher trained first.
BUGGY_METHOD = """
import sys
from trainer.methods.ce import CrossEntropyTraining
from trainer.cli.main import app

def training_loss(self, images, labels, teachers, clock):
    raise ValueError("shapes [64, 10] and [64, 9] do not match")

CrossEntropyTraining.training_loss = training_loss
app(sys.argv[1:])
"""


def test_a_bug_keeps_its_traceback_while_a_bad_config_is_one_line(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(CE_ONLY.format(output=tmp_path / "runs"))
    bug = subprocess.run(
        [sys.executable, "-c", BUGGY_METHOD, "distill", str(config), "--no-tracking"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bug.returncode == 1, bug.stderr
    assert "Traceback" in bug.stderr and "in training_loss" in bug.stderr
    assert "ValueError: shapes [64, 10] and [64, 9] do not match" in bug.stderr

    unknown_method = TINY.replace("{{name: kd,", "{{name: kdd,")
    config.write_text(unknown_method.format(checkpoint=tmp_path / "r20.pt", output=tmp_path / "runs"))
    bad = run("distill", str(config), cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) <= 3 and "method" in bad.stderr
    shown = run("--debug", "distill", str(config), cwd=tmp_path)
    assert shown.returncode == 2 and "Traceback" in shown.stderr


def test_version_and_verbose(tmp_path):
    version = run("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("ekd ")
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.format(checkpoint=tmp_path / "r20.pt", output=tmp_path / "runs"))
    verbose = run("-v", "teachers", "train", str(config), cwd=tmp_path)
    assert verbose.returncode == 0, verbose.stderr
    assert "DEBUG" in verbose.stderr
