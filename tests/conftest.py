"""Fixtures every suite shares."""

from __future__ import annotations

from pathlib import Path

import pytest
from image_folders import write_image_folder  # tests/ is on sys.path: pytest put this conftest's folder there


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """A session-wide copy of `write_image_folder`'s dataset (read-only: tests write elsewhere)."""
    return write_image_folder(tmp_path_factory.mktemp("imagenet"))
