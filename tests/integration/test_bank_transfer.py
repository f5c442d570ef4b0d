"""Banks that travel: `ekd cache export` of the LMDB bank a served run wrote (real Ray Data job, Parquet
shards) and `ekd cache import` into a three-shard Redis Cluster under another HMAC secret; a served run from
the imported bank makes no teacher call and trains as the run that wrote it. A damaged shard is named in one
line and not imported; the others are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_served_distill import KD, experiment, save_random_teachers, serve_teachers
from typer.testing import CliRunner

from services.cache import open_store
from services.cache.authentication import HMAC_KEY_ENV
from services.cache.local_redis import RedisCluster
from trainer.bank.transfer import MANIFEST
from trainer.cli.main import app
from trainer.config import ExperimentConfig
from trainer.runs.experiment import ExperimentResult
from trainer.runs.run import run_experiment

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("bank_transfer")]

EXPORTER_SECRET = "the exporting cluster's secret 0"
IMPORTER_SECRET = "the importing cluster's secret 1"


def served_run(tmp_path: Path, name: str, cache_uri: str) -> tuple[ExperimentResult, int]:
    """A served run from `cache_uri`, and the forward passes the service ran for it."""
    server, backend = serve_teachers(tmp_path, cache_uri)
    with server:
        at_start = backend.teacher_calls()  # the service's own start-up forwards
        source = {"kind": "served", "address": server.address, "cache": cache_uri}
        result = run_experiment(
            ExperimentConfig.model_validate(experiment(tmp_path, name, KD, teacher_source=source))
        )
        return result, backend.teacher_calls() - at_start


def entries(cache_uri: str) -> int:
    with open_store(cache_uri) as store:
        return sum(1 for _ in store.scan())


def test_an_exported_bank_trains_another_cluster_with_no_teacher_call(
    tmp_path: Path, redis_cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch, joined_ray: None
):
    save_random_teachers(tmp_path)
    origin_uri = f"lmdb://{tmp_path / 'origin'}"
    monkeypatch.setenv(HMAC_KEY_ENV, EXPORTER_SECRET)
    origin, origin_calls = served_run(tmp_path, "origin", origin_uri)
    assert origin_calls > 0
    banked = entries(origin_uri)

    runner = CliRunner()
    bank = tmp_path / "bank"
    exported = runner.invoke(app, ["cache", "export", origin_uri, str(bank), "--entries-per-shard", "1000"])
    assert exported.exit_code == 0, exported.output
    manifest = json.loads((bank / MANIFEST).read_text())
    shards = manifest["shards"]
    assert manifest["authenticated"] and len(shards) >= 3
    assert sum(shard["entries"] for shard in shards) == banked
    assert all(
        len(shard["sha256"]) == 64 and sum(shard["groups"].values()) == shard["entries"] for shard in shards
    )

    # Another cluster with a secret of its own: the values are verified under the exporter's and re-tagged.
    monkeypatch.setenv(HMAC_KEY_ENV, IMPORTER_SECRET)
    secret_file = tmp_path / "exporter.key"
    secret_file.write_text(EXPORTER_SECRET + "\n")
    imported = runner.invoke(
        app, ["cache", "import", str(bank), redis_cluster.url, "--source-hmac-key-file", str(secret_file)]
    )
    assert imported.exit_code == 0, imported.output
    assert f"imported {banked:,} entries from {len(shards)} of {len(shards)} shards" in imported.output
    assert entries(redis_cluster.url) == banked

    replayed, replayed_calls = served_run(tmp_path, "from-imported-bank", redis_cluster.url)
    print(
        f"{banked} entries in {len(shards)} shards; origin: {origin_calls} forward passes, {origin.counters}"
    )
    print(f"from the imported bank: {replayed_calls} forward passes, {replayed.counters}")
    assert replayed_calls == 0
    assert replayed.counters["teacher_calls"] == 0 and replayed.counters["cache_misses"] == 0
    assert replayed.counters["cache_corrupt"] == 0
    assert [row["loss"] for row in replayed.history] == pytest.approx([row["loss"] for row in origin.history])
    assert replayed.test_accuracy == origin.test_accuracy

    # One shard damaged in transit: named, not imported; the others are.
    damaged = bank / shards[1]["file"]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    again_uri = f"lmdb://{tmp_path / 'again'}"
    monkeypatch.setenv(HMAC_KEY_ENV, EXPORTER_SECRET)  # the exporter's own secret: no key file needed
    partial = runner.invoke(app, ["cache", "import", str(bank), again_uri])
    assert partial.exit_code == 2, partial.output
    error = next(line for line in partial.output.splitlines() if line.startswith("error:"))
    assert f"not imported: {shards[1]['file']}: sha256" in error
    assert f"(the other {len(shards) - 1} shards were)" in error
    assert entries(again_uri) == banked - shards[1]["entries"]
