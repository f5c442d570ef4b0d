"""Fixtures every suite shares, and the marks that keep the suite's parts consistent.

Every test under tests/integration/ starts Ray, a server process, redis-server or a training run, and is
marked `integration` here; test files elsewhere that do so mark themselves. `make test` runs the suite on two
workers (`--dist loadgroup`); a module whose tests share a module-scoped fixture (Ray joined in process, or
teachers trained once) joins an xdist group of its own, so that its tests run on one worker and the fixture
starts once; the session refuses to run if a group stops grouping. Each worker starts one Ray cluster, on
first use, that the Ray commands of its tests join (tests/integration/conftest.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from image_folders import write_image_folder  # tests/ is on sys.path: pytest put this conftest's folder there

# A test worker's share of the cores, as the compute threads of each of its processes: `make test` runs a
# worker per core, and torch's default of a thread per core in each would have OpenMP threads spinning against
# each other (the in-process recipe and served-run tests took 2.4 times as long). The environment variable is
# for every process the worker starts; this process's torch, already imported, is told directly.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Ray starts its workers at nice 15: beside the other test worker, or any other load at nice 0, they would get
# a few percent of a core, and a Ray test's deadlines would measure that load, not ekd. Inherited by every
# process the tests start.
os.environ.setdefault("RAY_worker_niceness", "0")

TESTS = Path(__file__).resolve().parent
INTEGRATION_FOLDER = TESTS / "integration"
# A test that takes longer than this without the `slow` mark is named at the end of the run.
SLOW_SECONDS = 10.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(INTEGRATION_FOLDER):
            item.add_marker(pytest.mark.integration)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Under `--dist loadgroup`, pytest-xdist groups a test by appending "@<group>" to its id; a pytest or
    xdist release that stops it would run Ray tests side by side, unnoticed. Refuse to run instead."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    ungrouped = [
        item.nodeid
        for item in session.items
        if item.get_closest_marker("xdist_group") and "@" not in item.nodeid
    ]
    if ungrouped:
        raise pytest.UsageError(
            f"--dist loadgroup does not group {ungrouped[0]} (and {len(ungrouped) - 1} more): this pytest "
            "and pytest-xdist no longer work together; see pyproject.toml's pins"
        )


def pytest_terminal_summary(terminalreporter) -> None:
    unmarked = [
        report
        for report in terminalreporter.getreports("passed") + terminalreporter.getreports("failed")
        if report.when == "call" and report.duration > SLOW_SECONDS and "slow" not in report.keywords
    ]
    if unmarked:
        terminalreporter.section(f"tests over {SLOW_SECONDS:g} s without the slow mark")
        for report in unmarked:
            terminalreporter.line(f"{report.duration:6.1f} s  {report.nodeid}")


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """A session-wide copy of `write_image_folder`'s dataset (read-only: tests write elsewhere)."""
    return write_image_folder(tmp_path_factory.mktemp("imagenet"))
