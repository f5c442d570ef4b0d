"""Reading the deployment files as their tools would: docker-compose's normalized config, kustomize builds of
deploy/, and the pod templates inside Kubernetes objects. (A module of its own, not conftest.py: test modules
import these, and with several conftest.py in one session the name `conftest` is ambiguous.)

There is no Docker engine, cluster or kustomize binary here. `docker-compose config` (Debian's docker-compose)
does the compose side; `kustomize_build` resolves a kustomization as far as deploy/ uses kustomize (resources,
and `patches` holding RFC 6902 JSON patches with a target) and refuses anything else, so that a kustomization
feature these tests do not model cannot slip in unchecked.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
IMAGE_CONFIGS = "/app/configs/"
"""Where the images hold the repository's configs/ (docker/Dockerfile.*: WORKDIR /app, COPY configs
./configs)."""


def load_documents(path: Path) -> list[dict]:
    """The YAML documents of a manifest file, empty ones dropped."""
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def repo_path(image_path: str) -> Path:
    """The repository file an image path under /app/configs/ comes from."""
    if not image_path.startswith(IMAGE_CONFIGS):
        raise ValueError(
            f"{image_path!r} is not under {IMAGE_CONFIGS}, the only repository files the images hold"
        )
    return REPO / "configs" / image_path.removeprefix(IMAGE_CONFIGS)


def compose_config(*files: str) -> dict:
    """`docker-compose -f FILE ... config` (which must accept the files), parsed."""
    executable = shutil.which("docker-compose")
    if executable is None:
        pytest.fail("docker-compose not found; install Debian's docker-compose package", pytrace=False)
    args = [executable, *(arg for name in files for arg in ("-f", name)), "config"]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(args[1:])} failed:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


# --- kustomize, as far as deploy/ uses it ---------------------------------------------------------------

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "patches"}


def kustomize_build(directory: Path) -> list[dict]:
    """The objects `kustomize build DIRECTORY` would emit, for kustomizations made of resources and JSON
    patches."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unmodelled = set(kustomization) - KUSTOMIZATION_FIELDS
    if unmodelled:
        raise ValueError(
            f"{directory}/kustomization.yaml uses {sorted(unmodelled)}, which tests/deploy does "
            f"not resolve; allowed: {sorted(KUSTOMIZATION_FIELDS)}"
        )
    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        objects += kustomize_build(path) if path.is_dir() else load_documents(path)
    for patch in kustomization.get("patches", []):
        if set(patch) != {"path", "target"}:
            raise ValueError(
                f"{directory}: a patch needs exactly `path` and `target` here, got {sorted(patch)}"
            )
        operations = yaml.safe_load((directory / patch["path"]).read_text())
        targets = [obj for obj in objects if _is_target(obj, patch["target"])]
        if not targets:
            raise ValueError(f"{directory}: patch {patch['path']} matches no resource ({patch['target']})")
        for obj in targets:
            apply_json_patch(obj, operations)
    return objects


def _is_target(obj: dict, target: dict) -> bool:
    group, version = target.get("group", ""), target.get("version")
    api_version = f"{group}/{version}" if group else version
    return (
        obj["kind"] == target["kind"]
        and obj["metadata"].get("name") == target["name"]
        and (version is None or obj["apiVersion"] == api_version)
    )


def _tokens(pointer: str) -> list[str]:
    if not pointer.startswith("/"):
        raise ValueError(f"JSON pointer must start with '/', got {pointer!r}")
    return [token.replace("~1", "/").replace("~0", "~") for token in pointer[1:].split("/")]


def apply_json_patch(document: dict, operations: list[dict]) -> None:
    """Apply RFC 6902 operations test, add, replace and remove to `document`, in place."""
    for operation in operations:
        *parents, last = _tokens(operation["path"])
        node = document
        for token in parents:
            node = node[int(token)] if isinstance(node, list) else node[token]
        key: int | str = last
        if isinstance(node, list):
            key = len(node) if last == "-" else int(last)
        kind = operation["op"]
        exists = 0 <= key < len(node) if isinstance(node, list) else key in node
        if kind in ("test", "replace", "remove") and not exists:
            raise ValueError(f"JSON patch {kind} at {operation['path']}: no such location")
        if kind == "test":
            if node[key] != operation["value"]:
                raise ValueError(
                    f"JSON patch test failed at {operation['path']}: {node[key]!r} != {operation['value']!r}"
                )
        elif kind == "add" and isinstance(node, list):
            node.insert(key, copy.deepcopy(operation["value"]))
        elif kind in ("add", "replace"):
            node[key] = copy.deepcopy(operation["value"])
        elif kind == "remove":
            del node[key]
        else:
            raise ValueError(f"unsupported JSON patch op {kind!r}; allowed: test, add, replace, remove")


# --- Kubernetes objects ---------------------------------------------------------------------------------


def ray_cluster_spec(obj: dict) -> dict:
    """The RayCluster spec inside a RayService or RayJob."""
    return obj["spec"]["rayClusterConfig" if obj["kind"] == "RayService" else "rayClusterSpec"]


def pod_templates(obj: dict) -> dict[str, dict]:
    """Every pod template in `obj`, by role: head and worker groups of a Ray cluster, a RayJob's submitter,
    the template of a StatefulSet or Job."""
    if obj["kind"] in ("RayService", "RayJob"):
        cluster = ray_cluster_spec(obj)
        templates = {"head": cluster["headGroupSpec"]["template"]}
        templates |= {group["groupName"]: group["template"] for group in cluster.get("workerGroupSpecs", [])}
        if "submitterPodTemplate" in obj["spec"]:
            templates["submitter"] = obj["spec"]["submitterPodTemplate"]
        return templates
    if obj["kind"] in ("StatefulSet", "Job"):
        return {"pod": obj["spec"]["template"]}
    return {}


def by_kind_and_name(objects: list[dict]) -> dict[tuple[str, str], dict]:
    """{(kind, name or generateName): object}."""
    return {
        (obj["kind"], obj["metadata"].get("name") or obj["metadata"]["generateName"]): obj for obj in objects
    }
