"""The compose stack's services run as local processes with their own commands and environment (no Docker
engine here): redis-server with the compose flags, `ekd serve` on the compose serve config, and the trainer's
`ekd distill` against them. The trainer must finish and the Redis cache must fill.

Container paths map onto a temporary tree (/app -> the repository's configs, /models -> teacher checkpoints
this test saves with random weights: the plumbing is under test, not accuracy, /run/secrets/<name> -> the
files scripts/make_dev_secrets.sh makes, as `make dev-secrets` does for compose), and service host names onto
127.0.0.1 ports: so the trainer reaches the service over TLS with the token, as in the stack.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import yaml

from services.cache.local_redis import free_port, running_redis_server
from services.teachers.spec import Preprocessing
from services.teachers.zoo import create_teacher, save_teacher_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SERVE_READY_SECONDS = 240  # beyond the compose healthcheck's start_period (180 s): this machine is slow
# Each probe is a Python process of its own: a few a minute leave the CPU to the service starting up.
PROBE_INTERVAL_SECONDS = 5


def localize(value: str, mapping: dict[str, str]) -> str:
    for container, local in mapping.items():
        value = value.replace(container, local)
    return value


def test_compose_services_run_as_local_processes(tmp_path):
    compose_file = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    compose = compose_file["services"]
    secrets = tmp_path / "secrets"
    subprocess.run(["bash", str(REPO / "scripts" / "make_dev_secrets.sh"), str(secrets)], check=True)
    app, models = tmp_path / "app", tmp_path / "models"
    shutil.copytree(REPO / "configs", app / "configs")
    (models / "digits").mkdir(parents=True)
    (app / "checkpoints").symlink_to(models, target_is_directory=True)  # as in the image
    preprocessing = Preprocessing(input_size=16, mean=(0.5,) * 3, std=(0.25,) * 3)
    for name in ("cifar_resnet56", "cifar_wrn16_4"):
        save_teacher_checkpoint(
            models / "digits" / f"{name}.pt", create_teacher(name, 10).model, name, 10, preprocessing
        )

    grpc_port = free_port()
    with running_redis_server(tmp_path / "redis", *compose["redis"]["command"][1:]) as redis_server:
        redis_port = redis_server.url.rsplit(":", 1)[1].split("/")[0]
        mapping = {
            "/app/": f"{app}/",
            "/models/": f"{models}/",
            "redis:6379": f"127.0.0.1:{redis_port}",
            "ray-head:50051": f"127.0.0.1:{grpc_port}",
            **{
                f"/run/secrets/{name}": str(secrets / Path(secret["file"]).name)
                for name, secret in compose_file["secrets"].items()
            },
        }
        serve_config = app / "configs" / "serve" / "compose.yaml"
        config = yaml.safe_load(localize(serve_config.read_text(), mapping))
        config["grpc"].update(host="127.0.0.1", port=grpc_port)  # loopback only, on a free port
        serve_config.write_text(yaml.safe_dump(config))

        def service_env(service: str) -> dict[str, str]:
            env = {k: localize(str(v), mapping) for k, v in compose[service].get("environment", {}).items()}
            return {**os.environ, **env, "RAY_AUTH_MODE": "disabled"}

        def command(service: str) -> list[str]:
            program, *args = compose[service]["command"]
            return [str(BIN / program), *(localize(a, mapping) for a in args)]

        # Its output goes to a file: a pipe nobody reads while waiting would fill and stall the server.
        serve_log = tmp_path / "serve.log"
        server = subprocess.Popen(
            command("ray-head"),
            env=service_env("ray-head"),
            cwd=app,
            stdout=serve_log.open("w"),
            stderr=subprocess.STDOUT,
        )
        try:
            probe = [
                localize(a, {"127.0.0.1:50051": f"127.0.0.1:{grpc_port}"})
                for a in compose["ray-head"]["healthcheck"]["test"][1:]
            ]
            probe[0] = sys.executable if probe[0] == "python" else probe[0]
            deadline = time.monotonic() + SERVE_READY_SECONDS
            probe_env = service_env("ray-head")  # the healthcheck runs in the ray-head container
            while subprocess.run(probe, cwd=REPO, env=probe_env, capture_output=True, timeout=30).returncode:
                assert server.poll() is None, f"ekd serve exited early:\n{serve_log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, (
                    f"ekd serve not healthy in time:\n{serve_log.read_text()[-3000:]}"
                )
                time.sleep(PROBE_INTERVAL_SECONDS)

            # One epoch: every view of it goes through the service and the cache; more would add only time.
            trainer = subprocess.run(
                [*command("trainer"), "--set", "train.epochs=1"],
                env=service_env("trainer"),
                cwd=app,
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert trainer.returncode == 0, trainer.stderr[-3000:]
            assert (app / "runs" / "digits-kd-ensemble" / "results.json").is_file()
            assert redis.Redis.from_url(redis_server.url).dbsize() > 0  # the service filled the cache
        finally:
            server.send_signal(signal.SIGINT)  # what `docker stop` sends first (as SIGTERM); Ctrl-C locally
            try:
                server.wait(timeout=60)
            finally:
                if server.poll() is None:
                    server.kill()
        assert server.returncode == 0, serve_log.read_text()[-3000:]
