"""The teacher-service schema: one YAML file (e.g. configs/serve/digits.yaml) validated by pydantic.

It says which teachers to host and how each is deployed on Ray Serve (replicas, dynamic batching, resources,
precision), where the gRPC ingress listens and with what limits, which output cache it shares, and where the
Prometheus metrics are exposed. A wrong field gets one `ConfigError` naming the field, the value and what
is allowed. YAML is data only: it never imports code.

Paths are resolved when the file is loaded: relative checkpoint and cache paths against the working directory
of the process that loads it (Ray replicas may run elsewhere), and `${VAR}` in the cache URI from the
environment, so that one file serves a laptop and a cluster (e.g. `uri: ${EKD_CACHE_URI}`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.core.contract import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_CONCURRENT_RPCS,
    DEFAULT_MAX_INFLIGHT_REQUEST_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_OUTPUT_DTYPE,
    OutputDtype,
)
from services.core.yaml_config import expand_environment, load_yaml_model
from services.rpc.limits import ServiceLimits
from services.rpc.security import DEFAULT_AUTH_EXEMPT_SERVICES
from services.teachers.engine import PRECISIONS
from services.teachers.zoo import check_teacher_name


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().absolute())


MaxBatchSize = Annotated[
    int,
    Field(
        ge=1,
        description="most samples one forward pass runs: @serve.batch merges concurrent requests up to "
        "this many samples (changeable at run time)",
    ),
]
BatchWaitTimeout = Annotated[
    float,
    Field(
        ge=0,
        le=10,
        description="seconds a partial batch waits for more requests before it runs (changeable at run time)",
    ),
]


class BatchingConfig(_Section):
    """A teacher deployment's `user_config`: the dynamic-batching knobs `reconfigure` applies at run time,
    so that a Serve config update (e.g. a RayService's serveConfigV2) retunes them without restarting
    replicas."""

    max_batch_size: MaxBatchSize
    batch_wait_timeout_s: BatchWaitTimeout


class AutoscalingConfig(_Section):
    """Serve autoscaling for one teacher: replicas follow the samples queued at the teacher (waiting for or
    in a forward pass), `ceil(queued / target_queued_samples)` within [min_replicas, max_replicas]
    (`services.serve.deployments.QueuedSamplesPolicy`), after Serve's up- and downscale delays."""

    min_replicas: int = Field(1, ge=1, description="replicas kept however idle the teacher is")
    max_replicas: int = Field(ge=1, description="most replicas (each takes its num_gpus and num_cpus)")
    target_queued_samples: int = Field(
        ge=1,
        description="samples one replica should have queued; a few batches (e.g. 2 x max_batch_size) keep "
        "its device busy while the next batch fills",
    )
    upscale_delay_s: float = Field(
        10.0, ge=0, description="seconds a higher demand must last to add replicas"
    )
    downscale_delay_s: float = Field(
        300.0, ge=0, description="seconds a lower demand must last to remove replicas"
    )

    @model_validator(mode="after")
    def _ordered_bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})"
            )
        return self


class TeacherDeploymentConfig(_Section):
    """One hosted teacher and the Ray Serve deployment that runs it."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="unique name on the server; what InferRequest.teachers refers to",
    )
    architecture: str = Field(
        description="architecture: a zoo entry (services.teachers.zoo.TEACHERS) or timm:<any timm model>"
    )
    num_classes: int = Field(ge=1, description="number of classes the checkpoint was trained for")
    checkpoint: str = Field(
        description="local checkpoint file (ekd.teacher.v1 or a state_dict); relative "
        "paths are resolved against the working directory"
    )
    num_replicas: int = Field(
        1, ge=1, description="replicas of this teacher's deployment (without autoscaling)"
    )
    autoscaling: AutoscalingConfig | None = Field(
        None, description="scale the replicas with the queued samples instead of a fixed num_replicas"
    )
    max_batch_size: MaxBatchSize = 64
    batch_wait_timeout_s: BatchWaitTimeout = 0.01
    max_ongoing_requests: int | None = Field(
        None,
        ge=1,
        description="requests one replica holds at once; "
        "default 4 x max_batch_size, so that batches can fill",
    )
    num_gpus: Literal["auto"] | Annotated[float, Field(ge=0)] = Field(
        "auto",
        description="GPUs per replica; 'auto': 0 without CUDA, else 1, or an equal share of the GPUs "
        "the deploying process sees when the replicas of 'auto' teachers outnumber them",
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica")
    precision: str = Field(
        "auto",
        description=f"engine precision: {', '.join(PRECISIONS)} ('auto' is bf16 "
        "autocast on CUDA, fp32 on CPU)",
    )
    compile: bool = Field(False, description="torch.compile the model in each replica")
    channels_last: bool = Field(
        True, description="on CUDA, run the model in channels_last (NHWC) memory layout, faster for convs"
    )

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, architecture: str) -> str:
        return check_teacher_name(architecture)

    @field_validator("checkpoint")
    @classmethod
    def _absolute_checkpoint(cls, checkpoint: str) -> str:
        if not checkpoint:
            raise ValueError("checkpoint must be a file path")
        return _absolute(checkpoint)

    @field_validator("precision")
    @classmethod
    def _known_precision(cls, precision: str) -> str:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
        return precision

    @model_validator(mode="after")
    def _replicas_fixed_or_autoscaled(self) -> TeacherDeploymentConfig:
        if self.autoscaling is not None and "num_replicas" in self.model_fields_set:
            raise ValueError("give either num_replicas or autoscaling, not both")
        return self

    @property
    def most_replicas(self) -> int:
        """The replicas this teacher may run at once."""
        return self.autoscaling.max_replicas if self.autoscaling is not None else self.num_replicas

    @model_validator(mode="after")
    def _default_max_ongoing_requests(self) -> TeacherDeploymentConfig:
        if self.max_ongoing_requests is None:
            self.max_ongoing_requests = 4 * self.max_batch_size
        return self

    def batching(self) -> BatchingConfig:
        return BatchingConfig(
            max_batch_size=self.max_batch_size, batch_wait_timeout_s=self.batch_wait_timeout_s
        )


class GrpcConfig(_Section):
    """Where the gRPC ingress listens, the limits it announces in ListTeachers and those that protect it.

    TLS and the bearer token are not here: they come from the environment of the process that serves
    (EKD_TLS_CERT_FILE, EKD_AUTH_TOKEN_FILE, ...; `services.rpc.security`), so that no secret sits in a
    config.
    """

    host: str = Field("127.0.0.1", min_length=1, description="interface to bind; 0.0.0.0 in a container")
    port: int = Field(50051, ge=0, le=65535, description="TCP port; 0 picks a free one (reported when ready)")
    max_batch_size: int = Field(
        DEFAULT_MAX_BATCH_SIZE,
        ge=1,
        description="most samples one InferRequest may carry (RESOURCE_EXHAUSTED beyond)",
    )
    max_message_bytes: int = Field(
        DEFAULT_MAX_MESSAGE_BYTES,
        ge=64 * 1024,
        description="gRPC message size limit for requests and responses, in bytes",
    )
    default_chunk_size: int = Field(
        DEFAULT_CHUNK_SIZE,
        ge=1,
        description="samples per streamed response when a request leaves chunk_size at 0",
    )
    replicas: int = Field(
        1,
        ge=1,
        description="GrpcIngress replicas; they share `port` (SO_REUSEPORT, so the kernel spreads the "
        "connections) on one node, or run one per node (max_replicas_per_node) behind a Service",
    )
    max_replicas_per_node: int | None = Field(
        None,
        ge=1,
        description="most ingress replicas on one node; 1 puts each on its own node, where metrics_port "
        "can then be fixed too",
    )
    default_dtype: OutputDtype = Field(
        DEFAULT_OUTPUT_DTYPE,
        description="output dtype when a request leaves output_dtype unspecified; what the "
        "cache stores by default",
    )

    max_concurrent_rpcs: int = Field(
        DEFAULT_MAX_CONCURRENT_RPCS,
        ge=1,
        description="most Infer RPCs one ingress replica processes at once (RESOURCE_EXHAUSTED beyond)",
    )
    max_inflight_request_bytes: int = Field(
        DEFAULT_MAX_INFLIGHT_REQUEST_BYTES,
        ge=64 * 1024,
        description="most bytes of Infer requests one ingress replica processes at once (RESOURCE_EXHAUSTED "
        "beyond); at least max_message_bytes",
    )
    auth_exempt_services: list[str] = Field(
        default_factory=lambda: list(DEFAULT_AUTH_EXEMPT_SERVICES),
        description="what may be called without the bearer token when one is set: full service names or "
        "'/service/Method' paths; the health service's Check by default, so that probes need no secret",
    )

    @model_validator(mode="after")
    def _limits_fit_together(self) -> GrpcConfig:
        self.limits  # noqa: B018 -- ServiceLimits checks how the limits fit together, once for every caller
        return self

    @model_validator(mode="after")
    def _shared_port_is_fixed(self) -> GrpcConfig:
        if self.replicas > 1 and self.port == 0:
            raise ValueError(
                "several ingress replicas share one port: give a fixed port (0 would give each its own)"
            )
        return self

    @property
    def limits(self) -> ServiceLimits:
        return ServiceLimits(
            max_batch_size=self.max_batch_size,
            max_message_bytes=self.max_message_bytes,
            default_chunk_size=self.default_chunk_size,
            default_dtype=self.default_dtype,
            max_concurrent_rpcs=self.max_concurrent_rpcs,
            max_inflight_request_bytes=self.max_inflight_request_bytes,
        )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class CacheConfig(_Section):
    """The content-keyed output cache the ingress reads before and writes after a forward pass."""

    uri: str | None = Field(
        None,
        description="lmdb:///abs/path, a plain path (LMDB; relative to the working "
        "directory), or redis://host:port/db; ${VAR} expands from the environment; "
        "absent: no cache",
    )

    @field_validator("uri")
    @classmethod
    def _expanded_uri(cls, uri: str | None) -> str | None:
        if uri is None:
            return None
        uri = expand_environment(uri)
        if not uri:
            raise ValueError("cache URI is empty; leave uri out to run without a cache")
        return uri if "://" in uri else _absolute(uri)


class ServeConfig(_Section):
    """Everything `ekd serve` and `serve deploy` need to bring up the teacher service."""

    teachers: list[TeacherDeploymentConfig] = Field(
        min_length=1, description="teachers to host, one deployment each"
    )
    grpc: GrpcConfig = Field(default_factory=GrpcConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="port of the ingress's Prometheus endpoint (/metrics); absent: not exposed",
    )
    metrics_host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="interface the metrics endpoint binds (plain HTTP, no authentication); 0.0.0.0 where a "
        "scraper in another container or pod must reach it",
    )

    @model_validator(mode="after")
    def _metrics_port_per_node(self) -> ServeConfig:
        grpc = self.grpc
        shared_node = grpc.replicas > 1 and grpc.max_replicas_per_node != 1
        if shared_node and self.metrics_port not in (None, 0):
            raise ValueError(
                f"metrics_port {self.metrics_port} would be bound by every ingress replica on a node: use 0 "
                "(each its own port) or grpc.max_replicas_per_node: 1"
            )
        return self

    @field_validator("teachers")
    @classmethod
    def _unique_names(cls, teachers: list[TeacherDeploymentConfig]) -> list[TeacherDeploymentConfig]:
        names = [teacher.name for teacher in teachers]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"teacher names must be unique on the server; repeated: {', '.join(repeated)}")
        return teachers


def load_serve_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ServeConfig:
    """Read and validate a service config YAML, with "dotted.key=value" `overrides` applied; all problems
    become one ConfigError naming the fields."""
    return load_yaml_model(path, ServeConfig, what="service config", overrides=overrides)
