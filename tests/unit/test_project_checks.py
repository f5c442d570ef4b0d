"""The project's own gates: the lock agrees with pyproject.toml, and ekd's own deprecations fail the tests."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CHECK_LOCK = REPO_ROOT / "scripts" / "check_lock.py"


def check_lock(pyproject: Path, lock: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CHECK_LOCK), str(pyproject), str(lock)], capture_output=True, text=True
    )


def test_the_committed_lock_agrees_with_pyproject() -> None:
    checked = check_lock(REPO_ROOT / "pyproject.toml", REPO_ROOT / "requirements.lock")

    assert checked.returncode == 0, checked.stderr


def test_a_dependency_the_lock_lacks_fails_the_check(tmp_path: Path) -> None:
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    grown = tmp_path / "pyproject.toml"
    grown.write_text(pyproject.replace("dependencies = [\n", 'dependencies = [\n  "wandb>=0.19",\n', 1))

    checked = check_lock(grown, REPO_ROOT / "requirements.lock")

    assert checked.returncode == 1
    assert "wandb>=0.19 is declared in pyproject.toml but not pinned in the lock" in checked.stderr
    assert "make lock" in checked.stderr


def test_a_range_that_excludes_the_locked_version_fails_the_check(tmp_path: Path) -> None:
    narrowed = tmp_path / "pyproject.toml"
    narrowed.write_text((REPO_ROOT / "pyproject.toml").read_text().replace('"timm==1.0.31"', '"timm>=2"'))

    checked = check_lock(narrowed, REPO_ROOT / "requirements.lock")

    assert checked.returncode == 1
    assert "timm>=2 is declared but the lock pins timm==1.0.31" in checked.stderr


def test_a_pin_without_hashes_fails_the_check(tmp_path: Path) -> None:
    lock = (REPO_ROOT / "requirements.lock").read_text()
    unhashed = tmp_path / "requirements.lock"
    timm_with_hashes = re.compile(r"^timm==1\.0\.31 \\\n(    --hash=\S+( \\)?\n)+", re.MULTILINE)
    unhashed.write_text(timm_with_hashes.sub("timm==1.0.31\n", lock))

    checked = check_lock(REPO_ROOT / "pyproject.toml", unhashed)

    assert checked.returncode == 1
    assert "timm==1.0.31 has no --hash in the lock" in checked.stderr


def test_a_deprecation_raised_from_ekd_code_fails_the_test() -> None:
    with pytest.raises(DeprecationWarning, match="the old way"):
        warnings.warn_explicit(
            "the old way", DeprecationWarning, "trainer/bank/warm.py", 1, module="trainer.bank.warm"
        )
    with pytest.raises(FutureWarning):
        warnings.warn_explicit("changes soon", FutureWarning, "services/x.py", 1, module="services.x")


def test_a_library_deprecation_does_not_fail_the_test() -> None:
    # Raises if the policy applied to it.
    warnings.warn_explicit("their old way", DeprecationWarning, "ray/data/x.py", 1, module="ray.data.x")
