"""Fails when pyproject.toml and the lock disagree.

Every requirement pyproject.toml declares (the project's dependencies and every optional extra) must be pinned
in the lock, at a version its specifier admits, with hashes. A dependency added to pyproject.toml without
`make lock`, or a range narrowed past the locked version, is named here, one line each.

    python scripts/check_lock.py pyproject.toml requirements.lock
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

# One locked requirement: `name==version \` followed by its `--hash=` lines (pip-compile's layout).
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")


def locked_pins(lock_text: str) -> dict[str, tuple[Version, bool]]:
    """{canonical name: (version, has hashes)} of every pin in a pip-compile lock."""
    pins: dict[str, tuple[Version, bool]] = {}
    name = None
    for line in lock_text.splitlines():
        match = _PIN.match(line)
        if match:
            name = canonicalize_name(match.group(1))
            pins[name] = (Version(match.group(2)), False)
        elif name is not None and line.strip().startswith("--hash=sha256:"):
            pins[name] = (pins[name][0], True)
    return pins


def declared_requirements(pyproject: dict) -> list[Requirement]:
    project = pyproject["project"]
    declared = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        declared.extend(extra)
    return [Requirement(text) for text in declared]


def disagreements(pyproject: dict, lock_text: str) -> list[str]:
    pins = locked_pins(lock_text)
    problems = []
    for requirement in declared_requirements(pyproject):
        name = canonicalize_name(requirement.name)
        if name not in pins:
            problems.append(f"{requirement} is declared in pyproject.toml but not pinned in the lock")
            continue
        version, hashed = pins[name]
        if not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement} is declared but the lock pins {name}=={version}")
        if not hashed:
            problems.append(f"{name}=={version} has no --hash in the lock")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("lock", type=Path)
    args = parser.parse_args()
    problems = disagreements(tomllib.loads(args.pyproject.read_text()), args.lock.read_text())
    for problem in problems:
        print(f"{args.lock}: {problem}", file=sys.stderr)
    if problems:
        print(f"{args.lock}: run `make lock` to resolve pyproject.toml again", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
