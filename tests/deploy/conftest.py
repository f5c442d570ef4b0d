"""Fixtures over the deployment files (helpers in deploy_files.py)."""

from __future__ import annotations

import pytest
from deploy_files import DEPLOY, kustomize_build, load_documents


@pytest.fixture(scope="session")
def builds() -> dict[str, list[dict]]:
    """`kustomize build` of each deployable directory: deploy/base (GPU teachers) and deploy/overlays/cpu."""
    return {"base": kustomize_build(DEPLOY / "base"), "cpu": kustomize_build(DEPLOY / "overlays" / "cpu")}


@pytest.fixture(scope="session")
def jobs() -> list[dict]:
    """The run-on-demand manifests of deploy/jobs/."""
    return [obj for path in sorted((DEPLOY / "jobs").glob("*.yaml")) for obj in load_documents(path)]
