"""Losing a node of a Ray cluster. A two-node cluster on this machine (Ray's `cluster_utils.Cluster`: a head
node and a worker node, each with its own raylet and resources) runs the teacher service (Serve: an ingress
replica and a teacher replica on each node, the ingresses sharing one port) and a Ray Train distillation
from that service with one worker on each node (`execution.placement_strategy: SPREAD`). The worker node's
raylet is killed (SIGKILL) mid-epoch, and every process of that node goes with it. The training run resumes
from its last epoch checkpoint on the surviving node and ends as an undisturbed run of the same config on
the same cluster does (same losses, steps, accuracy and counters), and the service keeps answering gRPC
calls through the surviving ingress all along.

The runs are tiny (digits at 8×8, a cifar_resnet8 student, a cifar_resnet20 teacher, 2 epochs), and the
nodes declare more CPUs than the machine has: Ray's resources only place the workers here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import ray
import torch
from ray import serve
from ray._private import ray_constants
from ray._private.node import Node
from ray.cluster_utils import Cluster
from ray.serve.config import ProxyLocation

from services._generated import teacher_pb2, teacher_pb2_grpc
from services.cache.local_redis import free_port
from services.serve.deployments import APP_NAME, INGRESS_DEPLOYMENT, build_app, teacher_deployment_name
from services.serve.serve_config import CacheConfig, GrpcConfig, ServeConfig, TeacherDeploymentConfig
from trainer.config import ExperimentConfig
from trainer.runs.experiment import ExperimentResult, ensure_teachers
from trainer.runs.inputs import load_splits
from trainer.runs.run import run_experiment

pytestmark = [pytest.mark.faults, pytest.mark.slow]

T = TypeVar("T")

TEACHER = "t0"
# The node is lost in the second epoch, once the first epoch's checkpoint is committed.
EPOCHS = 2
# Logical CPUs: a training worker takes 1, a teacher replica TEACHER_CPUS, an ingress none. The head node
# holds both training workers once the worker node is gone.
HEAD_CPUS = 3
WORKER_NODE_CPUS = 2
TEACHER_CPUS = 0.25
# The GCS declares a node dead after this many failed health checks, this far apart (Ray's defaults: 5 and
# 3 s): the node's loss is noticed within seconds.
HEALTH_CHECK_PERIOD_MS = 500
HEALTH_CHECK_FAILURES = 4
DEADLINE_SECONDS = 30.0
# Generous on a loaded 2-core machine: a training epoch, or a node's processes dying after its raylet.
WAIT_SECONDS = 180.0
# Bounds on what Ray would otherwise wait for without end (a deployment, a run whose workers cannot start):
# a hang fails the test, and the fixture's teardown ends the cluster.
DEPLOY_SECONDS = 300.0
RUN_SECONDS = 600.0
PROBE_PAUSE_SECONDS = 0.25
# Between two probe calls: often enough to call through the loss, seldom enough to leave the CPU to the run.
PROBE_INTERVAL_SECONDS = 1.0
# What every client of the service does with UNAVAILABLE (services.rpc.client retries it): a call that
# lands on the dying ingress's connection is repeated, on a new connection, which only the survivor takes.
PROBE_ATTEMPTS = 5
# Process titles of what the worker node must host (Ray names its worker processes "ray::<actor class>").
HOSTED_ON_EACH_NODE = ("RayTrainWorker", INGRESS_DEPLOYMENT, teacher_deployment_name(TEACHER))


@dataclass
class TwoNodes:
    cluster: Cluster
    worker_node: Node
    address: str  # the teacher service's gRPC address: both ingress replicas listen on its port
    checkpoint: Path
    tmp_path: Path

    def experiment(self, name: str) -> ExperimentConfig:
        return experiment(self.tmp_path, name, self.checkpoint, self.address)


def experiment(tmp_path: Path, name: str, checkpoint: Path, address: str) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {
            "name": name,
            "seed": 0,
            "device": "cpu",
            "data": {"dataset": "digits", "image_size": 8, "views": 2, "pad": 1, "batch_size": 128},
            "teachers": [
                {
                    "name": "cifar_resnet20",
                    "checkpoint": str(checkpoint),
                    "served_as": TEACHER,
                    "train": {"epochs": 1, "lr": 0.05},
                }
            ],
            "method": {"name": "kd", "student": {"arch": "cifar_resnet8"}},
            "train": {"epochs": EPOCHS, "lr": 0.1},
            "teacher_source": {"kind": "served", "address": address},
            "execution": {
                "backend": "ray_train",
                "workers": 2,
                "max_failures": 1,
                "placement_strategy": "SPREAD",
                "storage_path": str(tmp_path / "ray" / name),
            },
            "output_dir": str(tmp_path / "runs"),
        }
    )


def serve_config(checkpoint: Path, cache: Path) -> ServeConfig:
    """The teacher on each node (two replicas, which Serve spreads over the nodes) behind one ingress replica
    per node; the ingresses share a fixed port, as behind a Kubernetes Service."""
    return ServeConfig(
        teachers=[
            TeacherDeploymentConfig(
                name=TEACHER,
                architecture="cifar_resnet20",
                num_classes=10,
                checkpoint=str(checkpoint),
                num_replicas=2,
                num_cpus=TEACHER_CPUS,
                precision="fp32",
            )
        ],
        grpc=GrpcConfig(port=free_port(), replicas=2, max_replicas_per_node=1),
        cache=CacheConfig(uri=str(cache)),
    )


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodes]:
    """The cluster with the service deployed and the teacher trained; this process is its driver."""
    tmp_path = tmp_path_factory.mktemp("node-loss")
    checkpoint = tmp_path / "teachers" / f"{TEACHER}.pt"
    cfg = experiment(tmp_path, "teacher", checkpoint, "127.0.0.1:1")
    ensure_teachers(cfg, load_splits(cfg), torch.device("cpu"))
    # Ray's unix sockets live under its temp dir, whose path must stay short (108 bytes for a socket path).
    ray_temp = Path(tempfile.mkdtemp(prefix="ekd-ray-"))
    gcs_port = free_port()
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv("RAY_AUTH_MODE", "disabled")
        # Ray's own processes that look for "the" cluster on this machine (Ray Train's placement group
        # cleaner) find this one, not another test's.
        environment.setenv("RAY_ADDRESS", f"127.0.0.1:{gcs_port}")
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "gcs_server_port": gcs_port,
                "num_cpus": HEAD_CPUS,
                "include_dashboard": False,
                "temp_dir": str(ray_temp),
                "_system_config": {
                    "health_check_period_ms": HEALTH_CHECK_PERIOD_MS,
                    "health_check_failure_threshold": HEALTH_CHECK_FAILURES,
                    # Ray's memory monitor kills workers when the machine's memory runs short, whoever uses
                    # it; on a shared test machine that would be another process's doing, not a node lost.
                    "memory_monitor_refresh_ms": 0,
                },
            },
        )
        try:
            worker_node = cluster.add_node(num_cpus=WORKER_NODE_CPUS)
            cluster.wait_for_nodes()
            cluster.connect()
            serve.start(proxy_location=ProxyLocation.Disabled)
            app = build_app(serve_config(checkpoint, tmp_path / "cache"))
            ingress = within(
                DEPLOY_SECONDS,
                "deploying the service",
                lambda: serve.run(app, name=APP_NAME, route_prefix=None),
            )
            address = ingress.address.remote().result(timeout_s=DEADLINE_SECONDS)
            yield TwoNodes(cluster, worker_node, address, checkpoint, tmp_path)
        finally:
            if ray.is_initialized():
                serve.shutdown()
                ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(ray_temp, ignore_errors=True)


def within(seconds: float, what: str, call: Callable[[], T]) -> T:
    """`call()`, or a test failure after `seconds` (it goes on in a daemon thread until the cluster ends)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:  # re-raised here
            outcome["error"] = error

    thread = threading.Thread(target=run, name=what, daemon=True)
    thread.start()
    thread.join(timeout=seconds)
    if thread.is_alive():
        pytest.fail(f"{what} did not end within {seconds:g} s", pytrace=False)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# ---- the worker node's processes --------------------------------------------------------------------------


def raylet_process(node: Node):
    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process


def children(pid: int) -> dict[int, str]:
    """{pid: command line} of the processes whose parent is `pid` (a raylet starts the node's workers)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        # Field 4 of /proc/PID/stat, after the command name in parentheses (which may hold spaces).
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found[int(entry.name)] = cmdline
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def checkpoints_committed(storage_path: Path) -> int:
    """Checkpoints Ray Train's controller has committed for the one run under `storage_path` (it writes its
    checkpoint manager's state there on each commit)."""
    for snapshot in storage_path.glob("*/checkpoint_manager_snapshot.json"):
        try:
            return len(json.loads(snapshot.read_text())["checkpoint_results"])
        except (OSError, ValueError):  # being written
            return 0
    return 0


@dataclass
class NodeKiller:
    """Kills the worker node's raylet (SIGKILL) once the training run under `storage_path` has committed its
    first epoch checkpoint: mid-way through the second epoch. Gives up when stopped first."""

    node: Node
    storage_path: Path
    node_processes: dict[int, str] = field(default_factory=dict)
    killed_at: float | None = None
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="node-killer", daemon=True)

    def _run(self) -> None:
        try:
            while checkpoints_committed(self.storage_path) < 1:
                if self.stop.wait(0.05):
                    return
            raylet = raylet_process(self.node)
            self.node_processes = children(raylet.pid)
            os.kill(raylet.pid, signal.SIGKILL)
            raylet.wait(timeout=DEADLINE_SECONDS)
            self.killed_at = time.monotonic()
        except BaseException as error:  # reported by the test
            self.error = error


# ---- the service, called all along ------------------------------------------------------------------------


@dataclass
class ProbeCall:
    started: float
    attempts: int
    ok: bool


@dataclass
class ServiceProbe:
    """Infer calls to the service one after another, each on a connection of its own (so that the kernel
    gives each to either ingress), until stopped."""

    address: str
    calls: list[ProbeCall] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="service-probe", daemon=True)
        images = torch.randint(
            0, 256, (2, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
        )
        self.request = teacher_pb2.InferRequest(
            teachers=[TEACHER],
            images=teacher_pb2.Tensor(
                dtype=teacher_pb2.UINT8, shape=list(images.shape), data=images.numpy().tobytes()
            ),
        )

    def _call(self) -> bool:
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(self.address, options=options) as channel:
            stub = teacher_pb2_grpc.TeacherServiceStub(channel)
            responses = list(stub.Infer(self.request, timeout=DEADLINE_SECONDS))
        return sum(len(response.cached) for response in responses) == 2

    def _run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            ok, attempts = False, 0
            while not ok and attempts < PROBE_ATTEMPTS:
                attempts += 1
                try:
                    ok = self._call()
                except grpc.RpcError as error:
                    if error.code() != grpc.StatusCode.UNAVAILABLE:
                        break
                    time.sleep(PROBE_PAUSE_SECONDS)
            self.calls.append(ProbeCall(started, attempts, ok))
            self.stop.wait(PROBE_INTERVAL_SECONDS)


# ---- the test ---------------------------------------------------------------------------------------------


def test_a_run_and_the_service_survive_losing_a_node(two_nodes: TwoNodes) -> None:
    undisturbed = within(
        RUN_SECONDS, "the undisturbed run", lambda: run_experiment(two_nodes.experiment("undisturbed"))
    )

    cfg = two_nodes.experiment("node-lost")
    killer = NodeKiller(two_nodes.worker_node, Path(cfg.execution.storage_path))
    probe = ServiceProbe(two_nodes.address)
    killer.thread.start()
    probe.thread.start()
    try:
        lost = within(RUN_SECONDS, "the run that loses a node", lambda: run_experiment(cfg))
    finally:
        probe.stop.set()
        probe.thread.join(timeout=WAIT_SECONDS)
        killer.stop.set()
        killer.thread.join(timeout=WAIT_SECONDS)
    assert killer.error is None, killer.error
    assert killer.killed_at is not None, "the run ended before the node was killed"

    # The worker node hosted a training worker, an ingress replica and a teacher replica, and lost them all.
    hosted = " ".join(killer.node_processes.values())
    for name in HOSTED_ON_EACH_NODE:
        assert name in hosted, f"no {name} on the worker node: {sorted(killer.node_processes.values())}"
    deadline = time.monotonic() + WAIT_SECONDS
    while survivors := [pid for pid in killer.node_processes if alive(pid)]:
        assert time.monotonic() < deadline, f"the lost node's processes {survivors} still run"
        time.sleep(0.1)

    # The checkpoint of epoch 0 came back; epoch 1 ran again after the resume, on the head node.
    assert [(row["epoch"], row["resumes"]) for row in lost.history] == [(0, 0), (1, 1)]
    assert_same_run(lost, undisturbed)

    # The service answered throughout: every call, before, during and after the loss, within a client's
    # retries of UNAVAILABLE; and calls kept coming after the node was gone.
    assert probe.calls and all(call.ok for call in probe.calls), probe.calls
    assert sum(call.started > killer.killed_at for call in probe.calls) >= 3, probe.calls
    print(
        f"\nundisturbed: {summary(undisturbed)}\nnode lost:   {summary(lost)}\n"
        f"service: {len(probe.calls)} calls answered, "
        f"{sum(call.started > killer.killed_at for call in probe.calls)} after the loss, "
        f"{sum(call.attempts > 1 for call in probe.calls)} retried"
    )


def assert_same_run(lost: ExperimentResult, undisturbed: ExperimentResult) -> None:
    """The same optimizer steps over the same samples with the same targets, and counters that count what
    the kept epochs did (the lost group's work since its last checkpoint died with it)."""
    assert lost.train_samples == undisturbed.train_samples
    assert lost.optimizer_steps == undisturbed.optimizer_steps
    assert [row["loss"] for row in lost.history] == pytest.approx(
        [row["loss"] for row in undisturbed.history]
    )
    assert lost.test_accuracy == undisturbed.test_accuracy
    assert undisturbed.counters["resumes"] == 0
    assert lost.counters == {**undisturbed.counters, "resumes": 1}


def summary(result: ExperimentResult) -> str:
    losses = ", ".join(f"{row['loss']:.6f}" for row in result.history)
    return (
        f"losses [{losses}] steps {result.optimizer_steps} samples {result.train_samples} "
        f"accuracy {result.test_accuracy:.4f} counters {result.counters}"
    )
