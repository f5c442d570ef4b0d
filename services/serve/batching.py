"""Dynamic batching of teacher requests, without Ray: what a teacher deployment does around its engine.

A request (uint8 images [B, C, H, W] and the outputs it wants) is split into pieces of at most
`max_batch_size` samples, each piece waits in a batch queue (Serve's `@serve.batch` in
`services.serve.deployments`), and each batch the queue releases goes through `forward_batch`: one forward
pass per group of same-shaped samples, over the union of the outputs the group asks for, split back per
request. Kept apart from the Serve adapter so that the batching behaviour can be tested with an engine alone.

The engine call is a parameter, `Forward`: an async callable, so that the caller decides where the forward
runs (the deployment runs it in a worker thread, so its replica keeps queueing the next batch meanwhile).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import torch

from services.teachers.engine import InputSpecError, UnknownOutputError

# forward(images, outputs) -> {output: tensor [B, ...]}, e.g. `TeacherEngine.infer` run in a thread.
Forward = Callable[[torch.Tensor, list[str]], Awaitable[dict[str, torch.Tensor]]]
# What a batch gives back for each request: its outputs, or the error that failed it alone.
Result = dict[str, torch.Tensor] | Exception


@dataclass(frozen=True)
class PendingRequest:
    """One request (or piece of one) waiting for its teacher's next forward pass."""

    images: torch.Tensor  # uint8 [B, C, H, W], B >= 1
    outputs: tuple[str, ...]


def sample_count(requests: list[PendingRequest]) -> int:
    """The size of a batch in samples, not requests: what `max_batch_size` bounds (Serve's batch_size_fn)."""
    return sum(request.images.shape[0] for request in requests)


async def infer_in_pieces(
    images: torch.Tensor,
    outputs: Sequence[str],
    max_batch_size: int,
    submit: Callable[[PendingRequest], Awaitable[Result]],
) -> dict[str, torch.Tensor]:
    """Submit a request to the batch queue (`submit`) in pieces of at most `max_batch_size` samples, since
    the queue cannot release a batch larger than that, and join the pieces' outputs back in order.

    Raises `InputSpecError` for anything but a non-empty [B, C, H, W] tensor, which the queue could not
    size by its first dimension, and the first error a piece failed with.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InputSpecError(f"expected a uint8 image batch [B, C, H, W] with B >= 1, got {shape}")
    # A bare name would otherwise be read letter by letter.
    requested = (outputs,) if isinstance(outputs, str) else tuple(outputs)
    pieces = images.split(max_batch_size)
    results = await asyncio.gather(*(submit(PendingRequest(piece, requested)) for piece in pieces))
    parts: list[dict[str, torch.Tensor]] = []
    for result in results:
        if isinstance(result, Exception):
            raise result
        parts.append(result)
    if len(parts) == 1:
        return parts[0]
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


async def forward_batch(requests: list[PendingRequest], forward: Forward) -> list[Result]:
    """The result of each request in a batch, in order: one forward per group of requests whose samples
    have the same dtype and shape, since only those can be stacked into one input."""
    groups: dict[tuple[torch.dtype, tuple[int, ...]], list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault((request.images.dtype, tuple(request.images.shape[1:])), []).append(index)
    results: dict[int, Result] = {}
    for indices in groups.values():
        results.update(zip(indices, await _forward_together([requests[i] for i in indices], forward)))
    return [results[index] for index in range(len(requests))]


async def _forward_together(requests: list[PendingRequest], forward: Forward) -> list[Result]:
    """One forward over the requests' samples and the union of their outputs, split back per request; a
    request the engine rejects fails alone."""
    outputs = list(dict.fromkeys(name for request in requests for name in request.outputs))
    # One request alone (the usual case once requests are large) is forwarded as it is, without a copy.
    images = requests[0].images if len(requests) == 1 else torch.cat([request.images for request in requests])
    try:
        merged = await forward(images, outputs)
    except (InputSpecError, UnknownOutputError) as error:
        if len(requests) == 1:
            return [error]
        return [result for request in requests for result in await _forward_together([request], forward)]
    if len(requests) == 1:
        return [merged]
    results: list[Result] = []
    start = 0
    for request in requests:
        stop = start + request.images.shape[0]
        # Cloned: a slice would carry the whole batch's storage across Ray's serialization.
        results.append({name: merged[name][start:stop].clone() for name in request.outputs})
        start = stop
    return results
