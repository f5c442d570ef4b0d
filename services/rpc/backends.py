"""Where the teacher server's forward passes run: the `TeacherBackend` protocol and its in-process form.

The gRPC servicer only talks to a `TeacherBackend`. `LocalBackend` runs `TeacherEngine`s in this process;
`services.serve.deployments` implements the same protocol on Ray Serve deployments, so the servicer has no Ray
in it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch

from services.teachers.engine import TeacherEngine
from services.teachers.spec import TeacherSpec

FORWARD_SLICE_BYTES = 8 * 2**20
"""`LocalBackend` runs a forward pass over at most this many bytes of images at a time, so that the float
copies an engine makes of its input (4 bytes per pixel, and more once resized) and the activations scale with
a slice, not with the request."""


class BackendUnavailableError(RuntimeError):
    """A teacher cannot serve right now (overloaded, restarting); the servicer answers UNAVAILABLE, which
    clients retry."""


@runtime_checkable
class TeacherBackend(Protocol):
    """The teachers a server hosts and the way to run them."""

    def specs(self) -> dict[str, TeacherSpec]:
        """Every hosted teacher by the name clients use for it."""

    def feature_shapes(self, name: str) -> dict[str, tuple[int, ...]]:
        """(channels, height, width) of every tap of teacher `name` at its model input size, as measured (the
        servicer checks that each shape has three dimensions)."""

    async def infer(self, name: str, images: torch.Tensor, outputs: list[str]) -> dict[str, torch.Tensor]:
        """Forward uint8 images [B, C, H, W] through teacher `name`: {output: float CPU tensor [B, ...]}."""

    def teacher_calls(self) -> int:
        """Forward passes run so far, over all teachers (constant across requests answered from the cache)."""


class LocalBackend:
    """`TeacherEngine`s in this process, by name. Forward passes run in worker threads (`asyncio.to_thread`),
    so the event loop keeps serving while a teacher computes; each engine runs one forward at a time, over
    slices of at most FORWARD_SLICE_BYTES of a request's images."""

    def __init__(self, engines: Mapping[str, TeacherEngine]) -> None:
        if not engines:
            raise ValueError("LocalBackend needs at least one teacher engine, got none")
        self._engines = dict(engines)
        # Measured once, here: every tap's shape depends only on the model and its input size.
        self._feature_shapes = {
            name: engine.feature_shapes(engine.spec.preprocessing.input_size)
            for name, engine in self._engines.items()
        }

    def specs(self) -> dict[str, TeacherSpec]:
        return {name: engine.spec for name, engine in self._engines.items()}

    def feature_shapes(self, name: str) -> dict[str, tuple[int, ...]]:
        return dict(self._feature_shapes[self._known(name)])

    async def infer(self, name: str, images: torch.Tensor, outputs: list[str]) -> dict[str, torch.Tensor]:
        return await asyncio.to_thread(_infer_in_slices, self._engines[self._known(name)], images, outputs)

    def teacher_calls(self) -> int:
        return sum(engine.calls for engine in self._engines.values())

    def _known(self, name: str) -> str:
        if name not in self._engines:
            raise ValueError(f"unknown teacher {name!r}; hosted: {', '.join(sorted(self._engines))}")
        return name


def _infer_in_slices(
    engine: TeacherEngine, images: torch.Tensor, outputs: list[str]
) -> dict[str, torch.Tensor]:
    """`engine.infer` over slices of at most FORWARD_SLICE_BYTES of `images`, joined. In one thread: the
    allocator keeps what a thread frees for that thread, so slices spread over threads would each keep one."""
    sample_bytes = math.prod(images.shape[1:]) * images.element_size() if images.ndim == 4 else 0
    per_slice = max(1, FORWARD_SLICE_BYTES // max(sample_bytes, 1))
    if images.ndim != 4 or images.shape[0] <= per_slice:  # one forward; the engine checks the images
        return engine.infer(images, outputs)
    pieces = [engine.infer(piece, outputs) for piece in images.split(per_slice)]
    return {output: torch.cat([piece[output] for piece in pieces]) for output in pieces[0]}
