"""User errors of the `ekd` console script: one line on stderr, exit status 2, no traceback, and never torch's
advice to load an untrusted file with weights_only=False. A cache URI's errors come from real processes, as a
user runs them; a refused student file, from the same command code in process (Typer's runner)."""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from services.cache.local_redis import free_port
from trainer.cli.main import app
from trainer.config import ExperimentConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EKD = str(Path(sys.executable).parent / "ekd")
# How torch words its advice to load a file it refused with weights_only=False, which can run its code.
TORCH_ADVICE = ("weights_only=False", "`weights_only` set to `False`", "Re-running `torch.load`")

EXPERIMENT = {
    "name": "tiny",
    "seed": 0,
    "data": {"dataset": "digits", "image_size": 8, "views": 1, "batch_size": 128},
    "teachers": [{"name": "cifar_resnet20", "checkpoint": "absent.pt"}],
    "method": {"name": "kd", "student": {"arch": "cifar_resnet8"}},
    "train": {"epochs": 1},
}


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([EKD, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def invoke(*args: str) -> subprocess.CompletedProcess:
    """The command in this process, its outcome in the form `run` gives it."""
    result = CliRunner().invoke(app, list(args))
    return subprocess.CompletedProcess(["ekd", *args], result.exit_code, result.stdout, result.stderr)


def assert_one_line_user_error(result: subprocess.CompletedProcess, *said: str) -> str:
    """The error line, the last on stderr, after checking it says each of `said`."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert not any(advice in result.stderr for advice in TORCH_ADVICE), result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: "), result.stderr
    for words in said:
        assert words in error
    return error


def test_a_cache_uri_with_an_unknown_query_parameter(tmp_path):
    uri = f"redis://:secret@127.0.0.1:{free_port()}/0?socket_timeout=1&bogus=1"
    stats = run("cache", "stats", uri, cwd=tmp_path)
    said = assert_one_line_user_error(stats, "unknown query parameters ['bogus']", "socket_timeout")
    assert stats.stderr.strip() == said
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(EXPERIMENT))
    served = run(
        "distill",
        str(config),
        "--teacher-service",
        f"127.0.0.1:{free_port()}",
        "--set",
        f"teacher_source.cache={uri}",
        cwd=tmp_path,
    )
    assert_one_line_user_error(served, "unknown query parameters ['bogus']")  # after mlflow's own log lines
    assert "secret" not in served.stderr


def run_directory(tmp_path: Path, student: bytes) -> Path:
    """A run directory of `ekd distill` whose exported student file holds `student`."""
    run_dir = tmp_path / "runs" / "tiny"
    (run_dir / "students" / "seed0").mkdir(parents=True)
    (run_dir / "students" / "seed0" / "student.pt").write_bytes(student)
    config = ExperimentConfig.model_validate(EXPERIMENT).model_dump(mode="json")
    record = {"seed": 0, "config": config, "headline": "student", "test_accuracy": 0.5}
    record["students"] = [{"name": "student", "test_accuracy": 0.5}]
    (run_dir / "results_seed0.json").write_text(json.dumps(record))
    return run_dir


def torch_saved(content: object, directory: Path) -> bytes:
    torch.save(content, directory / "saved.pt")
    return (directory / "saved.pt").read_bytes()


@pytest.mark.parametrize(
    "content, said",
    [
        ("random bytes", "not a readable torch checkpoint"),
        ("a pickle", "not a readable torch checkpoint"),
        ("a torch file of a pickled object", "pickles argparse.Namespace"),
    ],
)
def test_evaluate_refuses_a_student_file_that_is_no_export(tmp_path, content, said):
    student = {
        "random bytes": lambda: bytes(range(256)) * 64,
        "a pickle": lambda: pickle.dumps(argparse.Namespace(student="code")),
        "a torch file of a pickled object": lambda: torch_saved(argparse.Namespace(student="code"), tmp_path),
    }[content]()
    result = invoke("evaluate", str(run_directory(tmp_path, student)))
    error = assert_one_line_user_error(result, "cannot read exported student", "student.pt", said)
    assert result.stderr.strip() == error
