"""Which Ray a command joins, and a cluster address that does not answer: waited for within RAY_CLUSTER_WAIT,
then one line naming it (Ray's own connect would retry without end). Real sockets on 127.0.0.1."""

from __future__ import annotations

import logging
import re
import socket
import threading
import time

import pytest
import yaml
from typer.testing import CliRunner

from services.cache.local_redis import free_port
from services.core.errors import UserError
from trainer.cli.main import app
from trainer.runs import ray_address
from trainer.runs.outage import OutageWait
from trainer.runs.ray_address import ray_init_address

WAIT_SECONDS = 2.0


@pytest.fixture
def short_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        ray_address, "RAY_CLUSTER_WAIT", OutageWait(budget_seconds=WAIT_SECONDS, max_backoff_seconds=0.5)
    )


def test_without_an_address_a_private_instance_and_rays_own_words_left_to_ray(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_init_address(None) == "local"
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert ray_init_address(None) == "auto"
    dashboard = f"http://127.0.0.1:{free_port()}"  # not an address ray.init takes: Ray says so itself
    assert ray_init_address(dashboard) == dashboard


def test_a_cluster_whose_port_listens_is_joined_at_once():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        started = time.monotonic()
        assert ray_init_address(f"127.0.0.1:{port}") == f"127.0.0.1:{port}"
        assert ray_init_address(f"ray://127.0.0.1:{port}") == f"ray://127.0.0.1:{port}"
        assert time.monotonic() - started < 1.0


def test_a_cluster_that_comes_up_within_the_wait_is_joined(short_wait, caplog):
    port = free_port()
    listening = threading.Event()
    done = threading.Event()

    def listen_later() -> None:
        time.sleep(0.6)
        with socket.create_server(("127.0.0.1", port)):
            listening.set()
            done.wait(10)

    threading.Thread(target=listen_later, daemon=True).start()
    try:
        with caplog.at_level(logging.WARNING, logger="trainer.runs.outage"):
            assert ray_init_address(f"127.0.0.1:{port}") == f"127.0.0.1:{port}"
    finally:
        done.set()
    assert listening.is_set()
    assert f"Ray cluster at 127.0.0.1:{port} unreachable" in caplog.text and "is back after" in caplog.text


def test_a_dead_address_ends_the_wait_in_one_line_naming_it_and_where_it_came_from(short_wait, monkeypatch):
    port = free_port()  # nothing listens there
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(UserError) as raised:
        ray_init_address(None)
    assert WAIT_SECONDS <= time.monotonic() - started < WAIT_SECONDS + 5
    assert re.fullmatch(
        rf"no Ray cluster answers at 127\.0\.0\.1:{port} \(RAY_ADDRESS\): nothing accepted a connection on "
        rf"127\.0\.0\.1:{port} within 2 s \(.+\); start it \(`ray start --head`\) or give the address of one "
        "that runs",
        str(raised.value),
    ), raised.value


def test_ekd_distill_on_a_dead_cluster_is_a_one_line_error(short_wait, tmp_path):
    config = tmp_path / "ce.yaml"
    experiment = {
        "name": "ce",
        "data": {"dataset": "digits", "image_size": 8, "views": 0, "batch_size": 128},
        "method": {"name": "ce", "student": {"arch": "cifar_resnet8"}},
        "train": {"epochs": 1},
        "output_dir": str(tmp_path / "runs"),
    }
    config.write_text(yaml.safe_dump(experiment))
    dead = f"127.0.0.1:{free_port()}"
    result = CliRunner().invoke(app, ["distill", str(config), "--address", dead, "--no-tracking"])
    assert result.exit_code == 2, result.output
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: no Ray cluster answers at {dead}: nothing accepted a connection")
    assert "Traceback" not in result.stderr
