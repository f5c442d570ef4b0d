"""`ekd warm` (a real Ray Data job, real LMDB) fills the cache under the servicer's keys, so served
`ekd distill` of the same experiment makes no teacher call; `ekd cache stats/verify/evict` read it. On a real
Redis frozen mid-job, it waits, or past its wait stops in one line. (On Redis, a sweep after `ekd warm`
makes no teacher call: test_sweep.py.)

The teachers have random weights: the plumbing is under test, not accuracy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_served_distill import KD, experiment, save_random_teachers, serve_teachers
from typer.testing import CliRunner

from services.cache import open_store
from services.cache.layout import parse_key
from trainer.cli.main import app
from trainer.config import ExperimentConfig
from trainer.runs.run import run_experiment

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EKD = str(Path(sys.executable).parent / "ekd")


def warm(tmp_path: Path, config: Path, cache_uri: str, env: dict[str, str]) -> str:
    run = subprocess.run(
        [EKD, "warm", str(config), "--cache", cache_uri, "--batch-size", "512", "--no-tracking"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


# A served run from the bank trains one epoch: the warm job banked the views of every epoch alike.
SERVED_TRAIN = {"epochs": 1, "lr": 0.05}


def served_distill_calls_no_teacher(tmp_path: Path, cache_uri: str) -> None:
    """A served `kd` run of the warmed experiment from the bank at `cache_uri`: no forward pass, no miss."""
    server, backend = serve_teachers(tmp_path, cache_uri)
    with server:
        calls_at_start = backend.teacher_calls()  # the service's own start-up forwards (feature shapes)
        served_cfg = experiment(
            tmp_path,
            "kd-served",
            KD,
            teacher_source={"kind": "served", "address": server.address, "cache": cache_uri},
            train=SERVED_TRAIN,
        )
        result = run_experiment(ExperimentConfig.model_validate(served_cfg))
        assert backend.teacher_calls() == calls_at_start
    assert result.counters["teacher_calls"] == 0 and result.counters["cache_misses"] == 0


def test_compact_bank_is_seen_audited_and_evicted(tmp_path, ray_cluster_env):
    save_random_teachers(tmp_path)
    cache_uri = f"lmdb://{tmp_path / 'cache'}"
    config = tmp_path / "kd.yaml"
    config.write_text(
        yaml.safe_dump(experiment(tmp_path, "kd-compact", KD, teacher_source={"soft_labels": "compact"}))
    )
    warmed = warm(tmp_path, config, cache_uri, ray_cluster_env)
    rows = [line for line in warmed.splitlines() if "cifar_resnet20" in line]
    assert len(rows) == 2 and all(row.split("│")[4].strip() == "compact" for row in rows)

    runner = CliRunner()
    stats = runner.invoke(app, ["cache", "stats", cache_uri])
    assert stats.exit_code == 0, stats.output
    # Per teacher: the training views' compact logits and the test images' fp16 logits; an entry costs, all
    # in, at least its 22-byte key and its 39-byte frame (10 classes).
    rows = [line for line in stats.output.splitlines() if "│ logits" in line]
    assert sorted(row.split("│")[3].strip() for row in rows) == ["compact", "compact", "f16", "f16"]
    assert all(int(row.split("│")[7].strip()) >= 22 + 39 for row in rows if "compact" in row)

    verify = runner.invoke(app, ["cache", "verify", cache_uri, str(config), "--sample", "16"])
    assert verify.exit_code == 0, verify.output
    assert verify.output.count("│      16 │") == 2

    # A served run in the compact form reads the bank (no forward pass), and the service recomputes entries
    # for an audit without touching the cache.
    with open_store(cache_uri) as store:
        banked = sum(1 for _ in store.scan())
    server, backend = serve_teachers(tmp_path, cache_uri)
    with server:
        calls = backend.teacher_calls()
        served_cfg = experiment(
            tmp_path,
            "kd-compact-served",
            KD,
            teacher_source={
                "kind": "served",
                "address": server.address,
                "cache": cache_uri,
                "soft_labels": "compact",
            },
            train=SERVED_TRAIN,
        )
        served = run_experiment(ExperimentConfig.model_validate(served_cfg))
        assert backend.teacher_calls() == calls
        audit = ["cache", "verify", cache_uri, str(config), "--sample", "16", "--service", server.address]
        verify = runner.invoke(app, audit)
        assert verify.exit_code == 0, verify.output
        assert verify.output.count("│      16 │") == 2
        assert backend.teacher_calls() > calls
    assert served.counters["teacher_calls"] == 0 and served.counters["cache_misses"] == 0
    with open_store(cache_uri) as store:
        assert sum(1 for _ in store.scan()) == banked

    with open_store(cache_uri) as store:
        entries = sum(1 for _ in store.scan())
        tag = parse_key(next(iter(store.scan()))[0]).tag
    evict = runner.invoke(app, ["cache", "evict", cache_uri, "--teacher", tag])
    assert evict.exit_code == 0, evict.output
    with open_store(cache_uri) as store:
        assert 0 < sum(1 for _ in store.scan()) < entries


def test_cache_commands_name_a_bad_store_in_one_line(tmp_path):
    result = CliRunner().invoke(app, ["cache", "stats", "memcached://localhost:11211"])
    assert result.exit_code == 2
    assert "unsupported cache URI 'memcached://localhost:11211'" in result.output


def entries(cache_uri: str) -> int:
    with open_store(cache_uri) as store:
        return sum(1 for _ in store.scan())


def entries_per_teacher(cache_uri: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    with open_store(cache_uri) as store:
        for key, _ in store.scan():
            tag = parse_key(key).tag
            counts[tag] = counts.get(tag, 0) + 1
    return counts


def writer_actor_pids() -> list[int]:
    """Processes whose title names the warm job's writer actor (Ray titles its workers `ray::<actor>...`)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"_WriterActor" in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:  # the process ended while we looked
            continue
    return pids


def wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {seconds} s waiting for {what}"
        # Each look scans the whole cache: seldom enough to leave the CPU and the cache to the job.
        time.sleep(0.5)


@pytest.mark.faults
def test_warm_survives_a_killed_actor_and_ctrl_c_then_resumes(tmp_path, ray_cluster_env):
    """kill -9 of a writer actor mid-job: the job goes on writing. Ctrl-C mid-job: every value written so far
    reads back whole, and the rerun skips them and completes the bank, which a served run then trains from
    with no teacher call."""
    save_random_teachers(tmp_path)
    cache_uri = f"lmdb://{tmp_path / 'cache'}"
    config = tmp_path / "kd.yaml"
    config.write_text(yaml.safe_dump(experiment(tmp_path, "kd-warm", KD)))

    job = subprocess.Popen(
        [EKD, "warm", str(config), "--cache", cache_uri, "--batch-size", "32", "--no-tracking"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ray_cluster_env,
        cwd=tmp_path,
    )
    try:
        wait_until(lambda: len(entries_per_teacher(cache_uri)) == 2, 120, "the first values of both teachers")
        killed = writer_actor_pids()
        assert killed
        os.kill(killed[0], signal.SIGKILL)
        at_kill = entries(cache_uri)
        # Values keep coming (two batches' worth), unless the job got to its end meanwhile.
        wait_until(
            lambda: entries(cache_uri) > at_kill + 64 or job.poll() is not None, 300, "values after the kill"
        )
        job.send_signal(signal.SIGINT)
        job.communicate(timeout=60)
    finally:
        job.kill()
    at_interrupt = entries(cache_uri)
    with open_store(cache_uri) as store:
        keys = [key for key, _ in store.scan()]
        assert all(value is not None for value in store.get_many(keys))
        assert store.stats.corrupt == 0

    resumed = warm(tmp_path, config, cache_uri, ray_cluster_env)
    rows = [row.split("│") for row in resumed.splitlines() if "cifar_resnet20" in row]
    # Every value written before the interrupt is skipped, not recomputed (views that repeat an image, e.g.
    # the same crop twice, are skipped too, so the count may be higher); the rest, if the interrupt came
    # before the job had written everything, is computed.
    assert sum(int(row[6].strip().replace(",", "")) for row in rows) >= at_interrupt
    served_distill_calls_no_teacher(tmp_path, cache_uri)


@pytest.mark.faults
def test_warm_waits_out_a_frozen_redis_and_past_its_wait_stops_in_one_line(
    tmp_path, start_redis_server, ray_cluster_env
):
    """Redis frozen (SIGSTOP) mid-job, so every read and write times out. With a 2 s outage wait, the job
    stops with one line naming the setting, no traceback. With the default wait, the rerun says it is
    waiting, goes on when Redis thaws, and completes the bank from what the first job wrote, every value
    whole."""
    save_random_teachers(tmp_path)
    redis_server = start_redis_server()
    cache_uri = redis_server.url
    # The test's own reads wait longer than the job's 0.25 s socket timeout: the job keeps Redis busy, and
    # on a loaded machine a reply can take longer (the job itself waits that out).
    patient_uri = f"{cache_uri}?socket_timeout=30"
    config = tmp_path / "kd.yaml"
    config.write_text(yaml.safe_dump(experiment(tmp_path, "kd-warm", KD)))

    def start_warm(log: Path, *overrides: str) -> subprocess.Popen:
        command = [EKD, "warm", str(config), "--cache", cache_uri, "--batch-size", "32", "--no-tracking"]
        with log.open("w") as output:
            return subprocess.Popen(
                [*command, *(f"--set={o}" for o in overrides)],
                stdout=output,
                stderr=subprocess.STDOUT,
                env=ray_cluster_env,
                cwd=tmp_path,
            )

    def frozen_after_new_values(job: subprocess.Popen, log: Path, had: int) -> None:
        wait_until(lambda: entries(patient_uri) > had or job.poll() is not None, 300, "values")
        assert job.poll() is None, log.read_text()  # thousands of views were left to write
        os.kill(redis_server.process.pid, signal.SIGSTOP)

    short_log = tmp_path / "short-wait.log"
    job = start_warm(short_log, "teacher_source.outage_wait_seconds=2")
    try:
        frozen_after_new_values(job, short_log, 0)
        assert job.wait(timeout=300) == 2, short_log.read_text()
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
        job.kill()
    output = short_log.read_text()
    assert "Traceback" not in output, output
    # One error line, naming the teacher and the setting (worker lines forwarded by Ray may come after it).
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: teacher cifar_resnet20 ("), output
    assert "the cache stayed unreachable beyond teacher_source.outage_wait_seconds (2 s)" in errors[0]

    first_job = entries(patient_uri)
    log = tmp_path / "default-wait.log"
    job = start_warm(log)
    try:
        frozen_after_new_values(job, log, first_job)
        wait_until(lambda: "cache unreachable" in log.read_text() or job.poll() is not None, 120, "a warning")
        assert "waiting up to 600 s for it" in log.read_text() and job.poll() is None, log.read_text()
        os.kill(redis_server.process.pid, signal.SIGCONT)
        assert job.wait(timeout=600) == 0, log.read_text()
        assert "cache is back after" in log.read_text()
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
        job.kill()
    rows = [row.split("│") for row in log.read_text().splitlines() if "cifar_resnet20" in row and "│" in row]
    assert len(rows) == 2 and sum(int(row[6].strip().replace(",", "")) for row in rows) >= first_job, rows
    with open_store(patient_uri) as store:
        keys = [key for key, _ in store.scan()]
        assert all(value is not None for value in store.get_many(keys)) and store.stats.corrupt == 0
