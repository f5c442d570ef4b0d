"""deploy/overlays/redis-cluster checked statically: valid Kubernetes objects, every Ray container's cache URI
naming the cluster's pods as services.cache opens it, the create Job joining every pod, and room for the
headline recipe's fp16 bank on the primaries."""

from __future__ import annotations

import re

import kubernetes_validate
import pytest
import yaml
from deploy_files import DEPLOY, kustomize_build, pod_templates
from test_kubernetes import (
    BYTES_PER_LOGITS_ENTRY,
    CORE_KINDS,
    HEADLINE_RECIPE,
    IMAGENET_TRAIN_IMAGES,
    KUBERNETES_VERSION,
    by_kind_and_name,
    containers,
    env_of,
    keeps_compact_buckets_small,
    redis_bytes,
)

from services.cache.redis_cluster_store import seed_nodes

CLUSTER = "ekd-redis-cluster"


@pytest.fixture(scope="module")
def build() -> list[dict]:
    return kustomize_build(DEPLOY / "overlays" / "redis-cluster")


def test_core_objects_are_valid_kubernetes(build):
    for obj in build:
        if obj["kind"] in CORE_KINDS:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_every_ray_container_opens_the_cluster_with_the_secrets_password(build):
    objects = by_kind_and_name(build)
    service = objects["Service", CLUSTER]
    statefulset = objects["StatefulSet", CLUSTER]
    assert statefulset["spec"]["serviceName"] == CLUSTER and service["spec"]["clusterIP"] == "None"
    redis_port = next(port["port"] for port in service["spec"]["ports"] if port["name"] == "redis")
    pods = {f"{CLUSTER}-{n}.{CLUSTER}" for n in range(statefulset["spec"]["replicas"])}
    for role, template in pod_templates(objects["RayService", "ekd-teachers"]).items():
        for container in containers(template):
            env = env_of(container)
            names = [name for name, _ in env]
            assert names.index("REDIS_PASSWORD") < names.index("EKD_CACHE_URI"), role
            uri = dict(env)["EKD_CACHE_URI"]["value"]
            url, others = seed_nodes(uri)
            assert url.startswith("redis://:$(REDIS_PASSWORD)@"), role
            first = url.removeprefix("redis://:$(REDIS_PASSWORD)@").removesuffix("/0")
            nodes = [first, *(f"{node.host}:{node.port}" for node in others)]
            assert {node.rsplit(":", 1)[0] for node in nodes} <= pods and len(nodes) >= 2, role
            assert {int(node.rsplit(":", 1)[1]) for node in nodes} == {redis_port}, role


def test_the_create_job_joins_every_pod_with_a_replica_per_primary(build):
    objects = by_kind_and_name(build)
    replicas = objects["StatefulSet", CLUSTER]["spec"]["replicas"]
    (job,) = [obj for obj in build if obj["kind"] == "Job"]
    script = job["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    loop = re.search(r"for n in ([\d ]+); do", script)
    assert loop is not None and [int(n) for n in loop.group(1).split()] == list(range(replicas))
    assert "--cluster-replicas 1" in script
    assert objects["StatefulSet", "ekd-redis"]["spec"]["replicas"] == 0  # the single Redis is not run


def test_the_primaries_hold_the_headline_recipes_fp16_bank(build):
    objects = by_kind_and_name(build)
    config = objects["ConfigMap", f"{CLUSTER}-config"]["data"]["redis.conf"]
    directives = dict(
        line.split(maxsplit=1) for line in config.splitlines() if line and not line.startswith("#")
    )
    assert directives["cluster-enabled"] == "yes" and keeps_compact_buckets_small(directives)
    primaries = objects["StatefulSet", CLUSTER]["spec"]["replicas"] // 2
    recipe = yaml.safe_load(HEADLINE_RECIPE.read_text())
    entries = IMAGENET_TRAIN_IMAGES * recipe["data"]["views"] * len(recipe["teachers"])
    assert entries * BYTES_PER_LOGITS_ENTRY <= primaries * redis_bytes(directives["maxmemory"])
    (redis,) = containers(objects["StatefulSet", CLUSTER]["spec"]["template"])
    assert redis_bytes(directives["maxmemory"]) < redis_bytes(redis["resources"]["requests"]["memory"])
