"""docker-compose.yml (and the docker-compose.gpu.yml override) as `docker-compose config` normalizes them:
the health-gated start order redis -> ray-head -> trainer, the ports, the cache policy, and the serve config
ray-head loads."""

from __future__ import annotations

import pytest
import yaml
from deploy_files import REPO, compose_config, repo_path

from services.serve.serve_config import load_serve_config

HEALTHY = {"condition": "service_healthy"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return compose_config("docker-compose.yml")


@pytest.fixture(scope="module")
def compose_gpu() -> dict:
    return compose_config("docker-compose.yml", "docker-compose.gpu.yml")


def volume_mounts(service: dict) -> dict[str, tuple[str, str]]:
    """{container path: (named volume, mode)} from the normalized `source:target:mode` strings."""
    mounts = {}
    for entry in service["volumes"]:
        source, target, mode = entry.split(":")
        mounts[target] = (source, mode)
    return mounts


def published(service: dict) -> dict[int, str]:
    """{container port: host address} from the normalized `host_ip:published:target/proto` strings."""
    ports = {}
    for entry in service["ports"]:
        host_ip, _, target = entry.removesuffix("/tcp").split(":")
        ports[int(target)] = host_ip
    return ports


def unordered(service: dict) -> dict:
    """The service with its port and volume lists sorted: merging compose files reorders them."""
    return {key: sorted(value) if key in ("ports", "volumes") else value for key, value in service.items()}


def test_services_and_volumes(compose):
    assert set(compose["services"]) == {"redis", "ray-head", "trainer", "teachers"}
    assert set(compose["volumes"]) == {"redis-data", "models", "results"}


def test_redis_is_an_lru_cache_with_a_healthcheck(compose):
    redis = compose["services"]["redis"]
    assert redis["image"] == "redis:7"
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--maxmemory") + 1] == "2gb"
    assert command[command.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert int(command[command.index("--hash-max-listpack-value") + 1]) >= 63 + 16  # HMAC-tagged compact
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert volume_mounts(redis)["/data"] == ("redis-data", "rw")
    assert published(redis) == {6379: "127.0.0.1"}


def test_ray_head_serves_once_redis_is_healthy_and_probes_grpc_health(compose):
    head = compose["services"]["ray-head"]
    assert head["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert head["command"] == ["ekd", "serve", "/app/configs/serve/compose.yaml"]
    assert head["depends_on"] == {"redis": HEALTHY}
    assert head["environment"]["EKD_CACHE_URI"] == "redis://redis:6379/0"
    test = head["healthcheck"]["test"]
    assert test[:4] == ["CMD", "python", "-m", "services.rpc.healthcheck"]
    assert test[4] == "127.0.0.1:50051"
    assert published(head) == {50051: "127.0.0.1", 9090: "127.0.0.1"}
    assert volume_mounts(head)["/models"] == ("models", "ro")


def test_trainer_distills_from_ray_head_once_both_are_healthy(compose):
    trainer = compose["services"]["trainer"]
    assert trainer["command"] == [
        "ekd",
        "distill",
        "/app/configs/digits/kd_ensemble.yaml",
        "--teacher-service",
        "ray-head:50051",
    ]
    assert repo_path(trainer["command"][2]).is_file()
    assert trainer["environment"]["EKD_CACHE_URI"] == "redis://redis:6379/0"
    assert trainer["depends_on"] == {"redis": HEALTHY, "ray-head": HEALTHY}
    # The image's gRPC healthcheck does not apply to a process that serves nothing.
    assert trainer["healthcheck"] == {"test": ["NONE"]}
    assert volume_mounts(trainer)["/app/runs"] == ("results", "rw")


def test_teachers_one_off_trains_into_the_models_volume(compose):
    teachers = compose["services"]["teachers"]
    assert teachers["profiles"] == ["setup"]
    assert teachers["command"] == ["ekd", "teachers", "train", "/app/configs/digits/kd_ensemble.yaml"]
    assert volume_mounts(teachers)["/models"] == ("models", "rw")


def test_gpu_override_reserves_gpus_for_ray_head_on_the_cuda_image(compose, compose_gpu):
    head = compose_gpu["services"]["ray-head"]
    assert head["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    assert head["image"] == "ekd:cuda"
    (device,) = head["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    overridden = ("build", "image", "deploy")
    unchanged = {key: value for key, value in unordered(head).items() if key not in overridden}
    assert unchanged == {
        key: value
        for key, value in unordered(compose["services"]["ray-head"]).items()
        if key not in ("build", "image")
    }
    for name in ("redis", "trainer", "teachers"):
        assert unordered(compose_gpu["services"][name]) == unordered(compose["services"][name])


def test_ray_head_serve_config_matches_the_stack(compose, monkeypatch):
    head = compose["services"]["ray-head"]
    monkeypatch.setenv("EKD_CACHE_URI", head["environment"]["EKD_CACHE_URI"])
    config = load_serve_config(repo_path(head["command"][2]))
    assert config.grpc.host == "0.0.0.0"
    assert f"127.0.0.1:{config.grpc.port}" == head["healthcheck"]["test"][4]
    assert {config.grpc.port, config.metrics_port} == set(published(head))
    assert config.cache.uri == "redis://redis:6379/0"
    # The teachers the trainer's experiment names are the ones served, from the same files: the experiment's
    # checkpoints/... resolve under /app/checkpoints, which the images point at /models.
    experiment = yaml.safe_load((REPO / "configs" / "digits" / "kd_ensemble.yaml").read_text())
    served = {teacher.name: teacher.checkpoint for teacher in config.teachers}
    expected = {
        teacher["name"]: "/models/" + teacher["checkpoint"].removeprefix("checkpoints/")
        for teacher in experiment["teachers"]
    }
    assert served == expected
