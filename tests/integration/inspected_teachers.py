"""The service's Serve application with teacher replicas that also say what they did: forward passes, their
sizes and the batching in effect, for the tests that check batching and caching from outside. Deployed with
Serve's import path (`inspected_teachers:app_builder`), as the service's own `app_builder` is; Ray's workers
import this module from tests/integration/ (the Ray session puts it on their PYTHONPATH:
`RAY_RUNTIME_ENV`)."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import torch
from ray import serve
from ray.serve import Application

from services.serve.deployments import TeacherDeployment, build_app
from services.serve.serve_config import BatchingConfig, ServeConfig, load_serve_config

RECENT_BATCHES = 1024
RAY_RUNTIME_ENV = {"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent)}}


class InspectedTeacher(TeacherDeployment.func_or_class):
    def __init__(self, *args, **kwargs) -> None:
        self._batch_sizes: deque[int] = deque(maxlen=RECENT_BATCHES)
        super().__init__(*args, **kwargs)

    async def _run_engine(self, images: torch.Tensor, outputs: list[str]) -> dict[str, torch.Tensor]:
        merged = await super()._run_engine(images, outputs)
        self._batch_sizes.append(images.shape[0])
        return merged

    def forward_count(self) -> int:
        """Forward passes this replica's engine has run."""
        return self._engine.calls

    def replica_forward_count(self) -> tuple[str, int]:
        """This replica's id and `forward_count`: which replica answered, when there are several."""
        return serve.get_replica_context().replica_id.unique_id, self._engine.calls

    def recent_batch_sizes(self) -> list[int]:
        """Samples in each of the latest forward passes, oldest first."""
        return list(self._batch_sizes)

    def batching(self) -> BatchingConfig:
        """The batching settings in effect."""
        return self._batching


def inspected_app(config: ServeConfig) -> Application:
    return build_app(config, serve.deployment(InspectedTeacher))


def app_builder(args: dict[str, str]) -> Application:
    return inspected_app(load_serve_config(args["config"]))
