"""The teacher service on a real local Ray + Serve: two teacher deployments behind the gRPC ingress, called
over 127.0.0.1 with ordinary blocking stubs, each call with a deadline.

One Ray session serves the whole module. The application is deployed the way `serve run CONFIG.yaml` and
KubeRay's RayService deploy it, from a Serve config naming `services.serve.deployments:app_builder` (the CLI's
`serve deploy` needs the dashboard, which stays off here), so that a config update that changes only a
teacher's `user_config` reaches the running replica through `reconfigure`.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import ray
import torch
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from inspected_teachers import RAY_RUNTIME_ENV, inspected_app
from ray import serve
from ray.serve._private.api import serve_start
from ray.serve.config import ProxyLocation
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ServeDeploySchema

from services._generated import TEACHER_SERVICE_FULL_NAME, teacher_pb2, teacher_pb2_grpc
from services.cache import open_store
from services.cache.local_redis import free_port
from services.core.errors import ConfigError
from services.formats.codec import DTYPES_BY_PROTO_NAME, tensor_from_bytes
from services.rpc.client import TeacherClient
from services.serve.deployments import (
    APP_NAME,
    QUEUED_SAMPLES,
    QueuedSamplesPolicy,
    teacher_deployment_name,
)
from services.serve.serve_config import (
    AutoscalingConfig,
    GrpcConfig,
    ServeConfig,
    TeacherDeploymentConfig,
    load_serve_config,
)
from services.teachers.checkpoints import file_sha256
from services.teachers.engine import TeacherEngine
from services.teachers.spec import Preprocessing
from services.teachers.zoo import create_teacher, save_teacher_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("deployments")]

DEADLINE_SECONDS = 30.0
DEPLOY_SECONDS = 180.0
NUM_CLASSES = 10
PREPROCESSING = Preprocessing.cifar(16)
TEACHERS = ("resnet20_a", "resnet20_b")
MAX_BATCH_SIZE = 16
# Long enough for requests sent together from several threads to meet in one batch on a busy 2-core machine.
BATCH_WAIT_TIMEOUT_S = 0.25
REPO_ROOT = Path(__file__).resolve().parents[2]


def images(seed: int, count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, 16, 16), generator=generator, dtype=torch.uint8)


def save_checkpoints(directory: Path) -> dict[str, Path]:
    checkpoints = {}
    for seed, name in enumerate(TEACHERS):
        torch.manual_seed(seed)
        checkpoint = directory / f"{name}.pt"
        untrained = create_teacher("cifar_resnet20", NUM_CLASSES, preprocessing=PREPROCESSING)
        save_teacher_checkpoint(checkpoint, untrained, "cifar_resnet20", NUM_CLASSES, PREPROCESSING)
        checkpoints[name] = checkpoint
    return checkpoints


def write_serve_config(path: Path, checkpoints: dict[str, Path], cache_uri: str) -> Path:
    """Both teachers at half a CPU each (Ray has 2 here), gRPC and metrics on free ports, an LMDB cache."""
    teachers = [
        {
            "name": name,
            "architecture": "cifar_resnet20",
            "num_classes": NUM_CLASSES,
            "checkpoint": str(checkpoint),
            "max_batch_size": MAX_BATCH_SIZE,
            "batch_wait_timeout_s": BATCH_WAIT_TIMEOUT_S,
            "num_cpus": 0.5,
            "precision": "fp32",
        }
        for name, checkpoint in checkpoints.items()
    ]
    path.write_text(
        yaml.safe_dump(
            {"teachers": teachers, "grpc": {"port": 0}, "cache": {"uri": cache_uri}, "metrics_port": 0}
        )
    )
    return path


# ---- the served application ------------------------------------------------------------------------------


@dataclass
class Served:
    """The deployed application: where it listens, its teachers' handles and checkpoints, and a stub."""

    checkpoints: dict[str, Path]
    ingress: DeploymentHandle
    teachers: dict[str, DeploymentHandle]
    address: str
    stub: teacher_pb2_grpc.TeacherServiceStub
    channel: grpc.Channel
    deploy: Callable[[dict[str, dict[str, Any]] | None], None]
    cache_path: Path  # the service's LMDB cache

    def cached_entries(self) -> int:
        with open_store(str(self.cache_path)) as store:
            return sum(1 for _ in store.scan())

    def forward_counts(self) -> dict[str, int]:
        return {
            name: handle.forward_count.remote().result(timeout_s=DEADLINE_SECONDS)
            for name, handle in self.teachers.items()
        }

    def batch_sizes(self, name: str) -> list[int]:
        return self.teachers[name].recent_batch_sizes.remote().result(timeout_s=DEADLINE_SECONDS)


def serve_deploy_schema(
    config_path: Path, user_configs: dict[str, dict[str, Any]] | None
) -> ServeDeploySchema:
    """What a Serve config file for the service holds, with optional per-teacher user_config overrides."""
    application: dict[str, Any] = {
        "name": APP_NAME,
        "import_path": "inspected_teachers:app_builder",
        "route_prefix": None,
        "args": {"config": str(config_path)},
    }
    if user_configs:
        application["deployments"] = [
            {"name": teacher_deployment_name(name), "user_config": user_config}
            for name, user_config in user_configs.items()
        ]
    return ServeDeploySchema.model_validate({"proxy_location": "Disabled", "applications": [application]})


def wait_until_running() -> None:
    deadline = time.monotonic() + DEPLOY_SECONDS
    while time.monotonic() < deadline:
        application = serve.status().applications.get(APP_NAME)
        if application is not None and application.status == "RUNNING":
            return
        if application is not None and application.status == "DEPLOY_FAILED":
            pytest.fail(f"deploying {APP_NAME!r} failed: {application.message}", pytrace=False)
        time.sleep(0.2)
    pytest.fail(f"{APP_NAME!r} was not RUNNING within {DEPLOY_SECONDS} s: {serve.status()}", pytrace=False)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    directory = tmp_path_factory.mktemp("served")
    checkpoints = save_checkpoints(directory)
    config_path = write_serve_config(directory / "serve.yaml", checkpoints, str(directory / "cache"))
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv("RAY_AUTH_MODE", "disabled")
        # The replicas' log lines stay in Ray's log files: the tests read the service, not its logs.
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env=RAY_RUNTIME_ENV,
        )
        try:
            controller = serve_start(proxy_location=ProxyLocation.Disabled)

            def deploy(user_configs: dict[str, dict[str, Any]] | None = None) -> None:
                controller.deploy_apps(serve_deploy_schema(config_path, user_configs))
                wait_until_running()

            deploy()
            ingress = serve.get_app_handle(APP_NAME)
            address = ingress.address.remote().result(timeout_s=DEADLINE_SECONDS)
            teachers = {
                name: serve.get_deployment_handle(teacher_deployment_name(name), APP_NAME)
                for name in TEACHERS
            }
            with grpc.insecure_channel(address) as channel:
                yield Served(
                    checkpoints,
                    ingress,
                    teachers,
                    address,
                    teacher_pb2_grpc.TeacherServiceStub(channel),
                    channel,
                    deploy,
                    directory / "cache",
                )
        finally:
            serve.shutdown()
            ray.shutdown()


def infer_request(
    batch: torch.Tensor, teachers=TEACHERS, outputs=(), output_dtype=teacher_pb2.DTYPE_UNSPECIFIED
) -> teacher_pb2.InferRequest:
    tensor = teacher_pb2.Tensor(
        dtype=teacher_pb2.UINT8, shape=list(batch.shape), data=batch.numpy().tobytes()
    )
    return teacher_pb2.InferRequest(
        teachers=list(teachers), outputs=list(outputs), output_dtype=output_dtype, images=tensor
    )


def decode(tensor: teacher_pb2.Tensor) -> torch.Tensor:
    return tensor_from_bytes(
        tensor.data, DTYPES_BY_PROTO_NAME[teacher_pb2.DType.Name(tensor.dtype)], tensor.shape
    )


def infer(
    stub, request: teacher_pb2.InferRequest
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, list[bool]]]:
    """Reassembled outputs {teacher: {output: [B, ...]}} and per-sample `cached` flags {teacher: [B]}."""
    chunks: dict[str, list[teacher_pb2.InferResponse]] = {}
    for response in stub.Infer(request, timeout=DEADLINE_SECONDS):
        chunks.setdefault(response.teacher, []).append(response)
    outputs, cached = {}, {}
    for teacher, responses in chunks.items():
        responses.sort(key=lambda response: response.start)
        outputs[teacher] = {
            name: torch.cat([decode(response.outputs[name]) for response in responses])
            for name in responses[0].outputs
        }
        cached[teacher] = [flag for response in responses for flag in response.cached]
    return outputs, cached


def in_process_engine(checkpoint: Path) -> TeacherEngine:
    teacher = create_teacher("cifar_resnet20", NUM_CLASSES, checkpoint=checkpoint)
    return TeacherEngine(teacher, precision="fp32")


# ---- the service over gRPC -------------------------------------------------------------------------------


def test_list_teachers_describes_every_deployment(served: Served) -> None:
    listed = served.stub.ListTeachers(teacher_pb2.ListTeachersRequest(), timeout=DEADLINE_SECONDS)

    assert [info.name for info in listed.teachers] == list(TEACHERS)
    for info in listed.teachers:
        assert info.architecture == "cifar_resnet20"
        assert info.num_classes == NUM_CLASSES
        assert info.weights_sha256 == file_sha256(served.checkpoints[info.name])
        assert info.input.input_size == 16
        assert {tap.name: (tap.channels, tap.height, tap.width) for tap in info.taps} == {
            "layer1": (16, 16, 16),
            "layer2": (32, 8, 8),
            "layer3": (64, 4, 4),
        }
    assert listed.max_batch_size == 512


def test_served_outputs_equal_the_in_process_engine(served: Served) -> None:
    batch = images(seed=100, count=6)

    outputs, _ = infer(served.stub, infer_request(batch, outputs=["logits", "layer3"]))

    for name in TEACHERS:
        expected = in_process_engine(served.checkpoints[name]).infer(batch, ["logits", "layer3"])
        for output in ("logits", "layer3"):
            served_output = outputs[name][output]
            assert served_output.dtype == torch.float16  # the server default output dtype
            torch.testing.assert_close(served_output.float(), expected[output], atol=2e-2, rtol=1e-2)


def test_repeated_request_is_answered_from_the_cache_without_a_forward_pass(served: Served) -> None:
    request = infer_request(images(seed=200, count=5))

    entries_before = served.cached_entries()
    first, first_cached = infer(served.stub, request)
    counts_after_first = served.forward_counts()
    # The service writes its cache behind the answer: the repeat is asked once the first answer's entries
    # (5 samples x 2 teachers) are in.
    deadline = time.monotonic() + DEADLINE_SECONDS
    while served.cached_entries() < entries_before + 5 * len(TEACHERS) and time.monotonic() < deadline:
        time.sleep(0.1)
    second, second_cached = infer(served.stub, request)

    assert first_cached == {name: [False] * 5 for name in TEACHERS}
    assert second_cached == {name: [True] * 5 for name in TEACHERS}
    assert served.forward_counts() == counts_after_first
    for name in TEACHERS:
        torch.testing.assert_close(second[name]["logits"], first[name]["logits"], atol=0, rtol=0)


def concurrent_infers(served: Served, first_seed: int, requests: int, samples: int) -> list[torch.Tensor]:
    """Send `requests` Infer calls of `samples` new images each from as many threads at once; their logits."""
    start_together = threading.Barrier(requests, timeout=DEADLINE_SECONDS)

    def call(seed: int) -> torch.Tensor:
        request = infer_request(images(seed, samples), teachers=TEACHERS[:1])
        start_together.wait()
        outputs, cached = infer(served.stub, request)
        assert cached[TEACHERS[0]] == [False] * samples
        return outputs[TEACHERS[0]]["logits"]

    with ThreadPoolExecutor(max_workers=requests) as pool:
        return list(pool.map(call, range(first_seed, first_seed + requests)))


def test_concurrent_requests_share_forward_passes(served: Served) -> None:
    teacher = TEACHERS[0]
    before = len(served.batch_sizes(teacher))

    logits = concurrent_infers(served, first_seed=300, requests=8, samples=4)

    assert [tuple(each.shape) for each in logits] == [(4, NUM_CLASSES)] * 8
    new_batches = served.batch_sizes(teacher)[before:]
    assert sum(new_batches) == 32
    assert max(new_batches) > 4  # at least two requests met in one forward pass
    assert max(new_batches) <= MAX_BATCH_SIZE


def test_user_config_update_reconfigures_batching_in_the_running_replica(served: Served) -> None:
    teacher = TEACHERS[0]
    counts_before = served.forward_counts()

    served.deploy({teacher: {"max_batch_size": 4}})  # the wait timeout keeps its value

    handle = served.teachers[teacher]
    deadline = time.monotonic() + DEPLOY_SECONDS
    while (batching := handle.batching.remote().result(timeout_s=DEADLINE_SECONDS)).max_batch_size != 4:
        assert time.monotonic() < deadline, "the user_config update did not reach the replica"
        time.sleep(0.1)
    assert batching.batch_wait_timeout_s == BATCH_WAIT_TIMEOUT_S
    # The same replicas (their forward counts carried on) and the same ingress address: nothing restarted.
    assert served.forward_counts() == counts_before
    assert served.ingress.address.remote().result(timeout_s=DEADLINE_SECONDS) == served.address

    before = len(served.batch_sizes(teacher))
    concurrent_infers(served, first_seed=400, requests=4, samples=2)
    large = images(seed=500, count=10)  # more samples than the new max_batch_size: split into forward passes
    outputs, _ = infer(
        served.stub, infer_request(large, teachers=[teacher], output_dtype=teacher_pb2.FLOAT32)
    )

    new_batches = served.batch_sizes(teacher)[before:]
    assert sum(new_batches) == 8 + 10
    assert max(new_batches) <= 4
    expected = in_process_engine(served.checkpoints[teacher]).infer(large, ["logits"])["logits"]
    torch.testing.assert_close(outputs[teacher]["logits"], expected, atol=1e-4, rtol=1e-4)


def test_request_errors_keep_their_status_codes(served: Served) -> None:
    batch = images(seed=600, count=2)

    with pytest.raises(grpc.RpcError) as unknown_teacher:
        infer(served.stub, infer_request(batch, teachers=["no_such_teacher"]))
    with pytest.raises(grpc.RpcError) as unknown_output:
        infer(served.stub, infer_request(batch, outputs=["layer9"]))
    with pytest.raises(grpc.RpcError) as grayscale:
        infer(served.stub, infer_request(batch[:, :1]))

    assert unknown_teacher.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no_such_teacher" in unknown_teacher.value.details()
    assert unknown_output.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "layer9" in unknown_output.value.details()
    assert grayscale.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The service still answers after the errors.
    outputs, _ = infer(served.stub, infer_request(batch))
    assert set(outputs) == set(TEACHERS)


def test_health_service_reports_serving(served: Served) -> None:
    health = health_pb2_grpc.HealthStub(served.channel)
    for service in ("", TEACHER_SERVICE_FULL_NAME):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE_SECONDS)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_ingress_exposes_prometheus_metrics(served: Served) -> None:
    infer(served.stub, infer_request(images(seed=700, count=1)))
    metrics_address = served.ingress.metrics_address.remote().result(timeout_s=DEADLINE_SECONDS)

    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=DEADLINE_SECONDS) as response:
        text = response.read().decode()

    assert f'ekd_requests_total{{teacher="{TEACHERS[0]}"}}' in text


# ---- scaled out: two ingress replicas on one port, two teacher replicas, requests in flight ---------------

SCALED_APP = "ekd-scaled"
CONNECTIONS = 16  # all on one of two listeners: probability 2 * 2**-16


@pytest.fixture(scope="module")
def scaled(served: Served) -> Iterator[tuple[str, DeploymentHandle, DeploymentHandle]]:
    """A second application on the module's Ray: two GrpcIngress replicas sharing one fixed port, and the
    first teacher autoscaled on queued samples between 2 and 2 replicas (both run from the start). Its
    address, ingress handle and teacher handle."""
    teacher = TEACHERS[0]
    config = ServeConfig(
        teachers=[
            TeacherDeploymentConfig(
                name=teacher,
                architecture="cifar_resnet20",
                num_classes=NUM_CLASSES,
                checkpoint=str(served.checkpoints[teacher]),
                max_batch_size=MAX_BATCH_SIZE,
                num_cpus=0.25,
                precision="fp32",
                autoscaling=AutoscalingConfig(min_replicas=2, max_replicas=2, target_queued_samples=8),
            )
        ],
        grpc=GrpcConfig(port=free_port(), replicas=2),
        metrics_port=0,
    )
    ingress = serve.run(inspected_app(config), name=SCALED_APP, route_prefix=None)
    try:
        address = ingress.address.remote().result(timeout_s=DEADLINE_SECONDS)
        yield address, ingress, serve.get_deployment_handle(teacher_deployment_name(teacher), SCALED_APP)
    finally:
        serve.delete(SCALED_APP)


def per_replica(method: Callable[[], Any], replicas: int = 2) -> dict[str, int]:
    """Ask a deployment handle's method (answering (replica id, count)) until every replica answered."""
    answers: dict[str, int] = {}
    for _ in range(200):
        replica, count = method().result(timeout_s=DEADLINE_SECONDS)
        answers[replica] = count
        if len(answers) == replicas:
            return answers
    pytest.fail(f"only replicas {sorted(answers)} answered 200 calls; expected {replicas}", pytrace=False)


def test_two_ingress_replicas_share_the_port_and_both_answer(scaled) -> None:
    address, ingress, _ = scaled
    request = infer_request(images(seed=800, count=2), teachers=TEACHERS[:1])

    for _ in range(CONNECTIONS):
        # A channel of its own pool opens a TCP connection of its own, which the kernel gives to one of the
        # listeners on the port.
        with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            outputs, _ = infer(teacher_pb2_grpc.TeacherServiceStub(channel), request)
            assert outputs[TEACHERS[0]]["logits"].shape == (2, NUM_CLASSES)

    received = per_replica(ingress.replica_requests.remote)
    assert all(count > 0 for count in received.values()), received
    assert sum(received.values()) >= CONNECTIONS


def test_requests_in_flight_reach_both_teacher_replicas(scaled, served: Served) -> None:
    address, _, teacher = scaled
    batch = images(seed=900, count=32)

    with TeacherClient(
        address, timeout_seconds=DEADLINE_SECONDS, max_request_samples=4, max_in_flight=4
    ) as client:
        fetched = client.fetch(batch, TEACHERS[:1], ["logits"])
        assert client.stats.requests == 8

    expected = in_process_engine(served.checkpoints[TEACHERS[0]]).infer(batch, ["logits"])["logits"]
    torch.testing.assert_close(fetched[TEACHERS[0]]["logits"], expected, atol=2e-2, rtol=1e-2)
    forwards = per_replica(teacher.replica_forward_count.remote)
    assert all(count > 0 for count in forwards.values()), forwards
    # Nothing is queued once every request is answered: the autoscaling signal falls back to zero.
    assert teacher.record_autoscaling_stats.remote().result(timeout_s=DEADLINE_SECONDS) == {
        QUEUED_SAMPLES: 0.0
    }


def test_queued_samples_policy_asks_for_replicas_by_queued_samples() -> None:
    policy = QueuedSamplesPolicy(target_queued_samples=128)

    def decision(queued: dict[str, float] | None, current: int = 1) -> int:
        metrics = {QUEUED_SAMPLES: queued} if queued is not None else {}
        return policy(SimpleNamespace(aggregated_metrics=metrics, target_num_replicas=current))[0]

    assert decision({"r1": 300.0, "r2": 212.0}) == 4
    assert decision({"r1": 1.0}) == 1
    assert decision({"r1": 0.0, "r2": 0.0}, current=2) == 0  # Serve's min_replicas bounds it
    assert decision(None, current=3) == 3  # no report yet: keep the replicas


# ---- the config file -------------------------------------------------------------------------------------


def test_digits_serve_config_loads() -> None:
    config = load_serve_config(REPO_ROOT / "configs" / "serve" / "digits.yaml")

    assert [(teacher.name, teacher.architecture) for teacher in config.teachers] == [
        ("cifar_resnet56", "cifar_resnet56"),
        ("cifar_wrn16_4", "cifar_wrn16_4"),
    ]
    assert config.grpc.port == 50051
    assert Path(config.teachers[0].checkpoint).is_absolute()


def test_bad_serve_config_names_the_field_and_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "serve.yaml"
    monkeypatch.delenv("EKD_UNSET_CACHE_URI", raising=False)
    path.write_text(
        yaml.safe_dump(
            {
                "teachers": [
                    {"name": "a", "architecture": "cifar_resnet999", "num_classes": 10, "checkpoint": "a.pt"},
                    {
                        "name": "a",
                        "architecture": "cifar_resnet20",
                        "num_classes": 10,
                        "checkpoint": "a.pt",
                        "max_batch_size": 0,
                        "replicas": 2,
                    },
                ],
                "cache": {"uri": "${EKD_UNSET_CACHE_URI}"},
            }
        )
    )

    with pytest.raises(ConfigError) as error:
        load_serve_config(path)

    message = str(error.value)
    assert "teachers.0.architecture" in message and "'cifar_resnet999'" in message
    assert "available: " in message and "cifar_resnet20" in message
    assert "teachers.1.max_batch_size" in message
    assert "teachers.1.replicas" in message  # an unknown field
    assert "cache.uri" in message and "EKD_UNSET_CACHE_URI" in message


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ({"grpc": {"port": 0, "replicas": 2}}, "grpc: Value error, several ingress replicas share one port"),
        ({"grpc": {"port": 50051, "replicas": 2}, "metrics_port": 9090}, "metrics_port 9090 would be bound"),
        ({"autoscaling": {"max_replicas": 1, "target_queued_samples": 8}, "num_replicas": 2}, "not both"),
        (
            {"autoscaling": {"min_replicas": 3, "max_replicas": 2, "target_queued_samples": 8}},
            "must not exceed",
        ),
    ],
)
def test_scaling_options_that_cannot_work_are_config_errors(
    tmp_path: Path, section: dict[str, Any], problem: str
) -> None:
    teacher = {"name": "a", "architecture": "cifar_resnet20", "num_classes": 10, "checkpoint": "a.pt"}
    teacher_fields = {key: value for key, value in section.items() if key in ("autoscaling", "num_replicas")}
    config = {key: value for key, value in section.items() if key not in teacher_fields}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"teachers": [{**teacher, **teacher_fields}], **config}))

    with pytest.raises(ConfigError, match=problem):
        load_serve_config(path)
