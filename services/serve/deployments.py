"""Ray Serve adapters: one deployment per teacher with dynamic batching, and the gRPC ingress in front.

`TeacherDeployment` holds one `TeacherEngine`. `@serve.batch` merges concurrent requests (counted in samples,
up to `max_batch_size`, waiting at most `batch_wait_timeout_s`) into one forward pass over the union of the
outputs they ask for, and the results are split back per request (that logic, free of Ray, is
`services.serve.batching`). Both knobs are the deployment's `user_config`, so a Serve config update retunes
them through `reconfigure` without restarting replicas.

The gRPC ingress. The contract (proto/ekd/v1/teacher.proto) needs the standard grpc.health.v1 service, server
reflection and a configurable maximum message size; Serve's native gRPC proxy offers none of them (it has its
own Healthz). So the ingress is our grpc.aio server (`services.rpc.server.create_server`) over a
`RayServeBackend` that calls the teacher deployments' handles, and it is a Serve deployment itself
(`GrpcIngress`): its async constructor starts the server on the configured port in the replica's event loop,
which then serves it. So `serve run`/`serve deploy` of `app_builder`, and KubeRay's RayService, bring up the
whole service. The ingress also exposes the Prometheus metrics (`services.rpc.metrics`) on `metrics_port`. It
scales out: `grpc.replicas` replicas bind the same port with SO_REUSEPORT (grpc's default on Linux, set
explicitly by `create_server`), so the kernel spreads client connections over them on a node, and
`grpc.max_replicas_per_node: 1` puts one on each node instead, behind a Kubernetes Service.

Teachers scale by `num_replicas`, or with `autoscaling` by the samples queued at them: each replica reports
its queued samples (`record_autoscaling_stats`) and `QueuedSamplesPolicy` asks Serve for
`ceil(total queued / target_queued_samples)` replicas.

Entry points: `build_app(config)` from Python; `app_builder({"config": PATH})` for Serve's import-path form
(`serve run services.serve.deployments:app_builder config=configs/serve/digits.yaml`, or an application with
`import_path: services.serve.deployments:app_builder` and `args: {config: PATH}` in a Serve config file, where
PATH is read where Serve builds the app, e.g. inside the cluster); `serve_locally(config)` behind `ekd serve`.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast

import numpy as np
import ray
import torch
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import Application, Deployment
from ray.serve.config import AutoscalingContext, ProxyLocation
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from services.cache import open_store
from services.formats.codec import shared_tensor
from services.rpc.backends import BackendUnavailableError
from services.rpc.metrics import Metrics, start_metrics_server
from services.rpc.server import create_server
from services.serve.batching import PendingRequest, Result, forward_batch, infer_in_pieces, sample_count
from services.serve.serve_config import (
    AutoscalingConfig,
    BatchingConfig,
    CacheConfig,
    GrpcConfig,
    ServeConfig,
    TeacherDeploymentConfig,
    load_serve_config,
)
from services.teachers.engine import TeacherEngine
from services.teachers.spec import TeacherSpec
from services.teachers.zoo import create_teacher

APP_NAME = "ekd"
INGRESS_DEPLOYMENT = "GrpcIngress"
STOP_GRACE_SECONDS = 5.0
# The custom autoscaling metric a teacher replica reports: samples in it, batching or computing.
QUEUED_SAMPLES = "queued_samples"

# (C, H, W) of each tap, as the engine measures them (the servicer checks that each has three dimensions).
FeatureShapes = dict[str, tuple[int, ...]]
# What a teacher call raises when no replica can take it now (overloaded, restarting, failed to deploy).
_UNAVAILABLE = (BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError, RayActorError)


class _BatchSettings(Protocol):
    """The setters `@serve.batch` attaches to the method it wraps, which Ray's annotations type as a plain
    callable."""

    def set_max_batch_size(self, new_max_batch_size: int) -> None: ...

    def set_batch_wait_timeout_s(self, new_batch_wait_timeout_s: float) -> None: ...


def _deployment(decorated: type) -> Deployment:
    """A class decorated with `@serve.deployment`, typed as the `Deployment` it is at runtime: mypy does not
    apply class decorators, so it still sees the class."""
    return cast(Deployment, decorated)


def teacher_deployment_name(teacher: str) -> str:
    """The Serve deployment name of a hosted teacher (what a Serve config's `deployments:` entries name)."""
    return f"teacher-{teacher}"


@serve.deployment
class TeacherDeployment:
    """One teacher's engine behind Serve's dynamic batching; `infer` is what the ingress calls."""

    def __init__(self, teacher: TeacherDeploymentConfig) -> None:
        self._queued_samples = 0  # samples of the requests in this replica: batching or computing
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        model = create_teacher(teacher.architecture, teacher.num_classes, teacher.checkpoint)
        self._engine = TeacherEngine(
            model,
            device,
            precision=teacher.precision,
            compile=teacher.compile,
            channels_last=teacher.channels_last,
        )
        self._feature_shapes = self._engine.feature_shapes(self._engine.spec.preprocessing.input_size)
        self._apply(teacher.batching())

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply the deployment's user_config (at start and on every Serve config update): a
        `BatchingConfig`, whose missing fields keep their current values."""
        self._apply(BatchingConfig.model_validate({**self._batching.model_dump(), **user_config}))

    def _apply(self, batching: BatchingConfig) -> None:
        batch_settings = cast(_BatchSettings, self._forward)
        batch_settings.set_max_batch_size(batching.max_batch_size)
        batch_settings.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self._batching = batching

    def describe(self) -> tuple[TeacherSpec, FeatureShapes]:
        """The teacher's spec and the (C, H, W) of each tap at its input size."""
        return self._engine.spec, dict(self._feature_shapes)

    async def infer(self, images: np.ndarray, outputs: list[str]) -> dict[str, np.ndarray]:
        """Forward uint8 images [B, C, H, W]: {output: float32 [B, ...]} per requested output.

        The request joins the next batch; one larger than `max_batch_size` is split into several. Arrays,
        not tensors, cross the handle: Ray passes numpy arrays through its object store without copies
        (the images arrive as a read-only view of it), where it pickles a tensor's storage.
        """
        self._queued_samples += len(images)
        try:
            results = await infer_in_pieces(
                shared_tensor(images), outputs, self._batching.max_batch_size, self._forward
            )
        finally:
            self._queued_samples -= len(images)
        return {name: tensor.numpy() for name, tensor in results.items()}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's hook for custom autoscaling metrics: the signal `QueuedSamplesPolicy` scales on."""
        return {QUEUED_SAMPLES: float(self._queued_samples)}

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01, batch_size_fn=sample_count)
    async def _forward(self, requests: list[PendingRequest]) -> list[Result]:
        return await forward_batch(requests, self._run_engine)

    async def _run_engine(self, images: torch.Tensor, outputs: list[str]) -> dict[str, torch.Tensor]:
        # In a worker thread, so that the replica keeps queueing requests for the next batch meanwhile.
        return await asyncio.to_thread(self._engine.infer, images, outputs)


class QueuedSamplesPolicy:
    """Serve autoscaling policy (`AutoscalingConfig.policy`) for a teacher deployment: enough replicas that
    each has `target_queued_samples` samples queued, from the replicas' `record_autoscaling_stats`. Serve
    applies the bounds and the up- and downscale delays around it."""

    def __init__(self, target_queued_samples: float) -> None:
        if not target_queued_samples > 0:
            raise ValueError(f"target_queued_samples must be positive, got {target_queued_samples}")
        self.target_queued_samples = target_queued_samples

    def __call__(self, context: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        queued = (context.aggregated_metrics or {}).get(QUEUED_SAMPLES)
        if not queued:  # no report yet: keep what there is
            return context.target_num_replicas, {}
        return math.ceil(sum(queued.values()) / self.target_queued_samples), {}


def autoscaling_options(autoscaling: AutoscalingConfig) -> dict[str, Any]:
    """Serve's `autoscaling_config` for a teacher's `autoscaling` section."""
    return {
        "min_replicas": autoscaling.min_replicas,
        "max_replicas": autoscaling.max_replicas,
        "upscale_delay_s": autoscaling.upscale_delay_s,
        "downscale_delay_s": autoscaling.downscale_delay_s,
        "policy": {
            "policy_function": f"{__name__}:{QueuedSamplesPolicy.__name__}",
            "policy_kwargs": {"target_queued_samples": autoscaling.target_queued_samples},
        },
    }


class RayServeBackend:
    """`services.rpc.backends.TeacherBackend` over teacher deployments: each `infer` is a call to the
    teacher's `DeploymentHandle` (tensors travel in Ray's object store between the ingress and the teacher
    replicas)."""

    def __init__(
        self,
        handles: Mapping[str, DeploymentHandle],
        specs: Mapping[str, TeacherSpec],
        shapes: Mapping[str, FeatureShapes],
    ) -> None:
        if not handles:
            raise ValueError("RayServeBackend needs at least one teacher deployment handle, got none")
        if set(specs) != set(handles) or set(shapes) != set(handles):
            raise ValueError(
                f"specs {sorted(specs)} and feature shapes {sorted(shapes)} must name the same "
                f"teachers as the handles {sorted(handles)}"
            )
        self._handles = dict(handles)
        self._specs = dict(specs)
        self._shapes = {name: dict(shapes[name]) for name in handles}
        self._calls = 0

    @classmethod
    async def connect(cls, handles: Mapping[str, DeploymentHandle]) -> RayServeBackend:
        """Ask every teacher deployment for its spec and feature shapes (waits for a replica of each)."""
        names = list(handles)
        described = await asyncio.gather(*(handles[name].describe.remote() for name in names))
        return cls(
            handles,
            {name: spec for name, (spec, _) in zip(names, described)},
            {name: shapes for name, (_, shapes) in zip(names, described)},
        )

    def specs(self) -> dict[str, TeacherSpec]:
        return dict(self._specs)

    def feature_shapes(self, name: str) -> FeatureShapes:
        return dict(self._shapes[self._known(name)])

    async def infer(self, name: str, images: torch.Tensor, outputs: list[str]) -> dict[str, torch.Tensor]:
        handle = self._handles[self._known(name)]
        self._calls += 1
        try:
            results = await handle.infer.remote(images.numpy(), list(outputs))
        except _UNAVAILABLE as error:
            raise BackendUnavailableError(f"teacher {name!r} cannot serve right now: {error}") from error
        return {output: shared_tensor(array) for output, array in results.items()}

    def teacher_calls(self) -> int:
        """Infer calls sent to the teacher deployments (their batching may merge several into one forward
        pass)."""
        return self._calls

    def _known(self, name: str) -> str:
        if name not in self._handles:
            raise ValueError(f"unknown teacher {name!r}; hosted: {', '.join(sorted(self._handles))}")
        return name


# The ingress waits on the network and the teachers; a reserved CPU would starve teachers on small nodes.
@serve.deployment(name=INGRESS_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0})
class GrpcIngress:
    """The gRPC server (TeacherService, health, reflection) and the metrics endpoint, in a Serve replica."""

    # Serve awaits an async constructor in the replica's event loop; mypy requires __init__ to return None,
    # which an `async def` never does (it returns a coroutine).
    async def __init__(  # type: ignore[misc]
        self,
        grpc_config: GrpcConfig,
        cache_config: CacheConfig,
        metrics_port: int | None,
        teachers: dict[str, DeploymentHandle],
        metrics_host: str = "127.0.0.1",
    ) -> None:
        backend = await RayServeBackend.connect(teachers)
        self._host = grpc_config.host
        self._store = open_store(cache_config.uri) if cache_config.uri is not None else None
        self._metrics = Metrics()
        # Created here, in the coroutine of the loop that will serve it, as grpc.aio requires.
        self._server = create_server(
            backend,
            store=self._store,
            address=grpc_config.address,
            limits=grpc_config.limits,
            metrics=self._metrics,
            # TLS and the token from this replica's environment (services.rpc.security): the pod's or
            # container's, which Ray workers inherit; never through Ray's runtime_env, which Ray records.
            auth_exempt_services=grpc_config.auth_exempt_services,
        )
        await self._server.start()
        self._metrics_host = metrics_host
        self._metrics_http = (
            start_metrics_server(self._metrics, metrics_port, addr=metrics_host)
            if metrics_port is not None
            else None
        )

    def address(self) -> str:
        """host:port the gRPC server listens on (the bound port when the config asked for port 0)."""
        return f"{self._host}:{self._server.port}"

    def replica_requests(self) -> tuple[str, int]:
        """This replica's id and the Infer requests it has received: which replicas share the port."""
        received = sum(
            sample.value
            for metric in self._metrics.requests.collect()
            for sample in metric.samples
            if sample.name.endswith("_total")
        )
        return serve.get_replica_context().replica_id.unique_id, int(received)

    def metrics_address(self) -> str | None:
        """host:port of the Prometheus endpoint, None when the config exposes none."""
        if self._metrics_http is None:
            return None
        return f"{self._metrics_host}:{self._metrics_http[0].server_port}"

    async def __del__(self) -> None:
        await self._server.stop(STOP_GRACE_SECONDS)
        if self._metrics_http is not None:
            self._metrics_http[0].shutdown()
        if self._store is not None:
            self._store.close()


def _auto_gpus_per_replica(config: ServeConfig) -> float:
    """GPUs for each replica of a `num_gpus: auto` teacher: one where the GPUs visible here suffice, else an
    equal share, so that e.g. two small teachers on one GPU both start instead of one waiting forever."""
    if not torch.cuda.is_available():
        return 0.0
    replicas = sum(teacher.most_replicas for teacher in config.teachers if teacher.num_gpus == "auto")
    return min(1.0, torch.cuda.device_count() / max(replicas, 1))


def build_app(config: ServeConfig, teacher_deployment: Deployment | None = None) -> Application:
    """The Serve application: one `TeacherDeployment` per configured teacher (or `teacher_deployment`, a
    deployment of a subclass of its class), behind the `GrpcIngress`."""
    teacher_deployment = teacher_deployment or _deployment(TeacherDeployment)
    auto_gpus = _auto_gpus_per_replica(config)
    teachers: dict[str, Application] = {}
    for teacher in config.teachers:
        # TeacherDeploymentConfig's validator sets it (4 x max_batch_size) when the file leaves it out.
        assert teacher.max_ongoing_requests is not None
        teachers[teacher.name] = teacher_deployment.options(
            name=teacher_deployment_name(teacher.name),
            **(
                {"autoscaling_config": autoscaling_options(teacher.autoscaling)}
                if teacher.autoscaling is not None
                else {"num_replicas": teacher.num_replicas}
            ),
            max_ongoing_requests=teacher.max_ongoing_requests,
            user_config=teacher.batching().model_dump(),
            ray_actor_options={
                "num_cpus": teacher.num_cpus,
                "num_gpus": auto_gpus if teacher.num_gpus == "auto" else teacher.num_gpus,
            },
        ).bind(teacher)
    ingress = _deployment(GrpcIngress).options(
        num_replicas=config.grpc.replicas,
        # Ray annotates it Default[int], yet takes None as its own default: no limit per node.
        max_replicas_per_node=config.grpc.max_replicas_per_node,  # type: ignore[arg-type]
    )
    return ingress.bind(config.grpc, config.cache, config.metrics_port, teachers, config.metrics_host)


def app_builder(args: dict[str, str]) -> Application:
    """Serve's import-path entry point: `args` is {"config": path of a service config YAML}."""
    if set(args) != {"config"}:
        raise ValueError(
            f"app_builder takes exactly one argument, config=PATH of a service config YAML; "
            f"got {sorted(args)}"
        )
    return build_app(load_serve_config(args["config"]))


def deploy(config: ServeConfig) -> str:
    """Deploy the service on the Ray this process is connected to and return the ingress's gRPC address."""
    serve.start(proxy_location=ProxyLocation.Disabled)
    ingress = serve.run(build_app(config), name=APP_NAME, route_prefix=None)
    return ingress.address.remote().result()


def serve_locally(config: ServeConfig, *, on_ready: Callable[[str], None] | None = None) -> None:
    """Start a private local Ray (no dashboard), deploy the service, report the gRPC address (to `on_ready`,
    or print it), serve until SIGINT or SIGTERM, then shut Serve and Ray down."""
    # A cluster of this process alone, on this machine: Ray's token authentication has nothing to protect.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # "local", not Ray's default: without an address Ray joins the cluster that RAY_ADDRESS (or the last
    # `ray start` on this machine) names, and the shutdown below would take Serve down there.
    ray.init(address="local", include_dashboard=False)
    try:
        address = deploy(config)
        stop = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            (on_ready or print)(address)
            stop.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        serve.shutdown()
        ray.shutdown()
