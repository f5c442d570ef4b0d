"""TeacherClient against a real teacher server on 127.0.0.1, with real LMDB stores in tmp_path and a real
redis-server: results in input order, cache-first fetching, request splitting, status codes and retries, and
the compact soft-label form over the wire (streamed and cached frames, exactly `compress` of the logits) and
`bypass_cache` (a fresh forward pass that neither reads nor writes the cache).

Each server runs on its own event loop in a background thread, as a deployed server runs apart from the
trainer; the client under test is the ordinary blocking one. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch

from services._generated import teacher_pb2, teacher_pb2_grpc
from services.cache import COMPACT, input_digests, open_store, output_key
from services.formats.soft_labels import (
    COMPACT_BYTES,
    CompactLogits,
    compress,
    encode,
    entries_that_fit,
    frame_bytes,
)
from services.rpc.backends import LocalBackend
from services.rpc.client import (
    ClientStats,
    TeacherClient,
    TeacherServiceError,
    TeacherServiceUnavailable,
)
from services.rpc.limits import ServiceLimits
from services.rpc.server import BackgroundServer
from services.teachers.engine import TeacherEngine
from services.teachers.spec import Preprocessing
from services.teachers.zoo import create_teacher, save_teacher_checkpoint

pytestmark = pytest.mark.integration

DEADLINE_SECONDS = 20.0
NUM_CLASSES = 10
PREPROCESSING = Preprocessing.cifar(16)
TEACHERS = ["a", "b"]


# ---- teachers and servers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Checkpoints of two randomly initialised cifar_resnet20 teachers, so that each has a weights_sha256."""
    directory = tmp_path_factory.mktemp("teachers")
    paths = {}
    for seed, name in enumerate(TEACHERS):
        torch.manual_seed(seed)
        untrained = create_teacher("cifar_resnet20", NUM_CLASSES, preprocessing=PREPROCESSING)
        paths[name] = directory / f"{name}.pt"
        save_teacher_checkpoint(paths[name], untrained, "cifar_resnet20", NUM_CLASSES, PREPROCESSING)
    return paths


def load_engines(checkpoints: dict[str, Path]) -> dict[str, TeacherEngine]:
    return {
        name: TeacherEngine(create_teacher("cifar_resnet20", NUM_CLASSES, checkpoint=path))
        for name, path in checkpoints.items()
    }


@pytest.fixture
def reference(checkpoints) -> dict[str, TeacherEngine]:
    """Engines of the same teachers apart from the server's, so that computing expected values does not move
    the server's forward counts."""
    return load_engines(checkpoints)


class RecordingBackend(LocalBackend):
    """The in-process backend, noting the batch size of every forward pass it runs."""

    def __init__(self, engines: dict[str, TeacherEngine]) -> None:
        super().__init__(engines)
        self.forwards: list[tuple[str, int]] = []

    async def infer(self, name: str, images: torch.Tensor, outputs: list[str]) -> dict[str, torch.Tensor]:
        self.forwards.append((name, images.shape[0]))
        return await super().infer(name, images, outputs)


class ServerThread(BackgroundServer):
    def __init__(self, backend: LocalBackend, **options) -> None:
        super().__init__(backend, timeout_seconds=DEADLINE_SECONDS, **options)
        self.backend = backend


@pytest.fixture
def serve(checkpoints) -> Iterator[Callable[..., ServerThread]]:
    """Start servers of fresh engines of the test's teachers: `serve(store=..., max_message_bytes=...)`;
    all are stopped after the test."""
    servers = []

    def start(backend: LocalBackend | None = None, **options) -> ServerThread:
        servers.append(ServerThread(backend or RecordingBackend(load_engines(checkpoints)), **options))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def lmdb_store(tmp_path: Path):
    # One handle shared by server and client: a process opens an LMDB directory only once.
    store = open_store(str(tmp_path / "cache"))
    yield store
    store.close()


def client_of(server: ServerThread, **options) -> TeacherClient:
    return TeacherClient(server.address, timeout_seconds=DEADLINE_SECONDS, **options)


def images(seed: int, batch: int = 8) -> torch.Tensor:
    return torch.randint(
        0, 256, (batch, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def assert_fp16_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """The wire carries fp16: within its rounding of the float32 reference."""
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=2e-3, atol=1e-3)


# ---- results ---------------------------------------------------------------------------------------------


def test_fetch_equals_the_engines_in_input_order_for_two_teachers(serve, reference):
    server = serve()
    batch = images(0)
    with client_of(server) as client:
        fetched = client.fetch(batch, TEACHERS, ["logits", "layer3"])
        assert client.stats == ClientStats(
            samples=8, cache_hits=0, cache_misses=0, remote_samples=16, requests=1, retries=0
        )  # equal miss sets share one request
    assert set(fetched) == set(TEACHERS)
    for name in TEACHERS:
        expected = reference[name].infer(batch, ["logits", "layer3"])
        assert set(fetched[name]) == {"logits", "layer3"}
        assert fetched[name]["logits"].shape == (8, NUM_CLASSES)
        assert fetched[name]["layer3"].shape == (8, 64, 4, 4)
        for output in ("logits", "layer3"):
            assert_fp16_close(fetched[name][output], expected[output])
    # The order is the caller's: a permuted batch gives the same rows permuted.
    order = torch.tensor([5, 2, 7, 0, 1, 6, 3, 4])
    with client_of(server) as client:
        permuted = client.fetch(batch[order], TEACHERS, ["logits"])
    for name in TEACHERS:
        torch.testing.assert_close(permuted[name]["logits"], fetched[name]["logits"][order], rtol=0, atol=0)
    assert not torch.equal(fetched["a"]["logits"], fetched["b"]["logits"])


def test_per_teacher_outputs_mapping(serve, reference):
    server = serve()
    batch = images(1, batch=4)
    with client_of(server) as client:
        fetched = client.fetch(batch, TEACHERS, {"a": ["logits"], "b": ["layer2"]})
        assert client.stats.requests == 2  # different outputs: one request per teacher
    assert set(fetched["a"]) == {"logits"} and set(fetched["b"]) == {"layer2"}
    assert_fp16_close(fetched["a"]["logits"], reference["a"].infer(batch, ["logits"])["logits"])
    assert_fp16_close(fetched["b"]["layer2"], reference["b"].infer(batch, ["layer2"])["layer2"])


# ---- the cache -------------------------------------------------------------------------------------------


def test_second_fetch_is_answered_entirely_from_the_cache(serve, store, reference):
    server = serve(store=store)
    batch = images(2)
    with client_of(server, store=store) as client:
        calls_before = server.backend.teacher_calls()
        first = client.fetch(batch, TEACHERS, ["logits", "layer1"])
        assert server.running.servicer.wait_for_cache_writes()  # written in the background
        calls = server.backend.teacher_calls()
        assert calls - calls_before == 2  # one forward per teacher
        assert client.stats == ClientStats(
            samples=8, cache_hits=0, cache_misses=16, remote_samples=16, requests=1, retries=0
        )
        second = client.fetch(batch, TEACHERS, ["logits", "layer1"])
        assert server.backend.teacher_calls() == calls
        assert client.stats == ClientStats(
            samples=16, cache_hits=16, cache_misses=16, remote_samples=16, requests=1, retries=0
        )
    for name in TEACHERS:
        for output in ("logits", "layer1"):
            torch.testing.assert_close(second[name][output], first[name][output], rtol=0, atol=0)
        assert_fp16_close(second[name]["logits"], reference[name].infer(batch, ["logits"])["logits"])


def test_half_seen_batch_sends_only_the_unseen_half(serve, lmdb_store, reference):
    server = serve(store=lmdb_store)
    seen, unseen = images(3, batch=4), images(4, batch=4)
    mixed = torch.stack([image for pair in zip(seen, unseen) for image in pair])  # seen, unseen, seen, ...
    with client_of(server, store=lmdb_store) as client:
        client.fetch(seen, TEACHERS, ["logits"])
        assert server.running.servicer.wait_for_cache_writes()
        before, calls_before = client.stats, server.backend.teacher_calls()
        fetched = client.fetch(mixed, TEACHERS, ["logits"])
        after = client.stats
    assert after.cache_hits - before.cache_hits == 8  # 4 seen images x 2 teachers
    assert after.cache_misses - before.cache_misses == 8
    assert after.remote_samples - before.remote_samples == 8
    assert after.requests - before.requests == 1
    # One forward per teacher for the seen batch, then one per teacher of only the 4 unseen images.
    assert sorted(server.backend.forwards) == [("a", 4), ("a", 4), ("b", 4), ("b", 4)]
    assert server.backend.teacher_calls() - calls_before == 2
    for name in TEACHERS:
        assert_fp16_close(fetched[name]["logits"], reference[name].infer(mixed, ["logits"])["logits"])


def test_teachers_without_weights_are_never_looked_up(serve, lmdb_store):
    torch.manual_seed(5)
    random_engine = TeacherEngine(create_teacher("cifar_resnet20", NUM_CLASSES, preprocessing=PREPROCESSING))
    server = serve(RecordingBackend({"random": random_engine}), store=lmdb_store)
    batch = images(5, batch=3)
    calls_before = server.backend.teacher_calls()
    with client_of(server, store=lmdb_store) as client:
        assert client.teachers()["random"].weights_sha256 == ""
        first = client.fetch(batch, ["random"], ["logits"])
        second = client.fetch(batch, ["random"], ["logits"])
        assert client.stats == ClientStats(
            samples=6, cache_hits=0, cache_misses=0, remote_samples=6, requests=2, retries=0
        )
    assert server.backend.teacher_calls() - calls_before == 2
    assert lmdb_store.stats.hits == 0 and lmdb_store.stats.puts == 0
    torch.testing.assert_close(second["random"]["logits"], first["random"]["logits"], rtol=0, atol=0)


# ---- splitting requests ----------------------------------------------------------------------------------


def test_max_request_samples_splits_the_batch_and_keeps_the_order(serve, reference):
    server = serve()
    batch = images(6)
    with client_of(server, max_request_samples=3) as client:
        fetched = client.fetch(batch, ["a"], ["logits"])
        assert client.stats.requests == 3
    assert server.backend.forwards == [("a", 3), ("a", 3), ("a", 2)]
    assert_fp16_close(fetched["a"]["logits"], reference["a"].infer(batch, ["logits"])["logits"])


def test_small_server_message_limit_is_respected_by_splitting(serve, reference):
    # 2048 bytes hold two 768-byte 16x16 RGB images per request, so 8 images take 4 requests.
    server = serve(limits=ServiceLimits(max_message_bytes=2048))
    batch = images(7)
    with client_of(server) as client:
        fetched = client.fetch(batch, TEACHERS, ["logits"])
        assert client.stats.requests == 4
    for name in TEACHERS:
        assert_fp16_close(fetched[name]["logits"], reference[name].infer(batch, ["logits"])["logits"])


# ---- requests in flight ----------------------------------------------------------------------------------


class GatedBackend(LocalBackend):
    """Holds each forward until `together` requests are at the server at once (a bounded wait), noting the
    most it ever held together: how many requests the client had in flight."""

    def __init__(self, engines: dict[str, TeacherEngine], together: int) -> None:
        super().__init__(engines)
        self.together = together
        self.held = 0
        self.most_held = 0
        self.forwards: list[tuple[str, int]] = []

    async def infer(self, name: str, images: torch.Tensor, outputs: list[str]) -> dict[str, torch.Tensor]:
        self.held += 1
        self.most_held = max(self.most_held, self.held)
        deadline = time.monotonic() + DEADLINE_SECONDS / 2
        while self.most_held < self.together and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        try:
            self.forwards.append((name, images.shape[0]))
            return await super().infer(name, images, outputs)
        finally:
            self.held -= 1


@pytest.mark.parametrize("in_flight", [1, 3])
def test_max_in_flight_requests_are_at_the_server_together(serve, checkpoints, reference, in_flight):
    server = serve(GatedBackend(load_engines(checkpoints), together=in_flight))
    batch = images(40, batch=12)
    with client_of(server, max_request_samples=2, max_in_flight=in_flight) as client:
        fetched = client.fetch(batch, ["a"], ["logits"])
        assert client.stats.requests == 6
    assert server.backend.most_held == in_flight
    assert sorted(server.backend.forwards) == [("a", 2)] * 6
    assert_fp16_close(fetched["a"]["logits"], reference["a"].infer(batch, ["logits"])["logits"])


def test_submitted_fetches_overlap_and_each_gets_its_own_results(serve, checkpoints, reference):
    server = serve(GatedBackend(load_engines(checkpoints), together=2))
    first, second = images(41, batch=3), images(42, batch=5)
    with client_of(server, max_in_flight=2) as client:
        pending_first = client.submit(first, ["a"], ["logits"])
        pending_second = client.submit(second, ["b"], ["logits", "layer3"])
        second_result = pending_second.result()  # asked first: the first fetch lands on the way
        first_result = pending_first.result()
        assert client.stats.requests == 2
    assert server.backend.most_held == 2
    assert_fp16_close(first_result["a"]["logits"], reference["a"].infer(first, ["logits"])["logits"])
    expected = reference["b"].infer(second, ["logits", "layer3"])
    for output in ("logits", "layer3"):
        assert_fp16_close(second_result["b"][output], expected[output])


def test_max_in_flight_must_be_a_positive_int(serve):
    server = serve()
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="max_in_flight"):
            client_of(server, max_in_flight=bad)


# ---- errors and retries ----------------------------------------------------------------------------------


def test_teacher_list_describes_the_hosted_teachers(serve, checkpoints):
    server = serve(limits=ServiceLimits(max_batch_size=64))
    with client_of(server) as client:
        described = client.teachers()
    assert sorted(described) == TEACHERS
    a = described["a"]
    engine = load_engines(checkpoints)["a"]
    assert (a.architecture, a.num_classes) == ("cifar_resnet20", NUM_CLASSES)
    assert a.identity == engine.spec.identity
    assert a.weights_sha256 == engine.spec.weights_sha256 and a.cached
    assert (a.input.channels, a.input.input_size, a.input.dtype) == (3, 16, "uint8")
    assert a.taps == {"layer1": (16, 16, 16), "layer2": (32, 8, 8), "layer3": (64, 4, 4)}
    assert a.outputs == ("logits", "layer1", "layer2", "layer3")
    assert a.output_dtypes == ("float32", "float16", "bfloat16")


def test_unknown_teacher_and_bad_arguments_are_clear_errors(serve):
    server = serve()
    batch = images(8, batch=2)
    with client_of(server) as client:
        with pytest.raises(TeacherServiceError, match=r"NOT_FOUND.*'nobody'.*hosts a, b") as raised:
            client.fetch(batch, ["a", "nobody"], ["logits"])
        assert raised.value.code == grpc.StatusCode.NOT_FOUND
        assert server.address in str(raised.value)
        with pytest.raises(
            ValueError,
            match=r"teacher 'a' has no outputs \['layer9'\]; it provides "
            r"logits, layer1, layer2, layer3",
        ):
            client.fetch(batch, ["a"], ["layer9"])
        with pytest.raises(ValueError, match=r"got the string 'logits' \(did you mean \['logits'\]\?\)"):
            client.fetch(batch, ["a"], "logits")
        with pytest.raises(ValueError, match=r"must name exactly the teachers \['a', 'b'\]; got \['a'\]"):
            client.fetch(batch, TEACHERS, {"a": ["logits"]})
        with pytest.raises(ValueError, match=r"uint8 \[B, C, H, W\] batch; got torch.float32"):
            client.fetch(batch.float(), ["a"], ["logits"])
        # A status the server sends (for images with the wrong channel count) keeps its code and detail.
        with pytest.raises(
            TeacherServiceError,
            match=r"Infer \(request \w+\) failed with INVALID_ARGUMENT: "
            r".*got 1 channels",
        ) as raised:
            client.fetch(batch[:, :1], ["a"], ["logits"])
        assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert client.stats.retries == 0


def test_dead_address_is_unavailable_after_the_bounded_retries(free_tcp_port):
    address = f"127.0.0.1:{free_tcp_port}"
    with TeacherClient(address, timeout_seconds=5.0, retries=2, backoff_seconds=0.01) as client:
        with pytest.raises(
            TeacherServiceUnavailable,
            match=rf"at {address} unavailable: ListTeachers failed "
            r"3 times, last with UNAVAILABLE",
        ) as raised:
            client.fetch(images(9, batch=2), ["a"], ["logits"])
        assert raised.value.address == address
        assert client.stats.retries == 2


def test_a_server_back_on_the_same_port_between_retries_answers(serve, checkpoints, free_tcp_port, reference):
    address = f"127.0.0.1:{free_tcp_port}"
    server = serve(address=address)
    backend_after_restart = RecordingBackend(load_engines(checkpoints))
    batch = images(10, batch=4)
    with TeacherClient(address, timeout_seconds=DEADLINE_SECONDS, retries=8, backoff_seconds=0.05) as client:
        client.teachers()  # connected and described; the next call is an Infer
        server.close()

        def restart_after_the_first_failure() -> None:
            deadline = time.monotonic() + DEADLINE_SECONDS
            while client.stats.retries == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            serve(backend_after_restart, address=address)

        restarter = threading.Thread(target=restart_after_the_first_failure)
        restarter.start()
        try:
            fetched = client.fetch(batch, ["a"], ["logits"])
        finally:
            restarter.join(timeout=DEADLINE_SECONDS)
        assert client.stats.retries >= 1 and client.stats.requests == 1
    assert backend_after_restart.forwards == [("a", 4)]
    assert_fp16_close(fetched["a"]["logits"], reference["a"].infer(batch, ["logits"])["logits"])


# ---- the compact soft-label form over gRPC (InferRequest.logits_form COMPACT) ----------------------------


def assert_same_compact(actual: CompactLogits, expected: CompactLogits) -> None:
    assert isinstance(actual, CompactLogits) and actual.num_classes == expected.num_classes
    assert encode(actual) == encode(expected)  # frames are exact: equal frames, equal values


def test_compact_logits_are_the_compressed_logits_from_the_stream_and_from_the_cache(serve, store, reference):
    server = serve(store=store)
    batch = images(10)
    expected = {name: compress(reference[name].infer(batch, ["logits"])["logits"]) for name in TEACHERS}
    with client_of(server, store=store) as client:
        cold = client.fetch(batch, TEACHERS, ["logits", "layer3"], logits_form=COMPACT)
        assert server.running.servicer.wait_for_cache_writes()
        calls = server.backend.teacher_calls()
        warm = client.fetch(batch, TEACHERS, ["logits", "layer3"], logits_form=COMPACT)
        assert server.backend.teacher_calls() == calls  # the second fetch came from the cache
        assert client.stats.cache_hits == len(TEACHERS) * len(batch)
    for name in TEACHERS:
        assert_same_compact(cold[name]["logits"], expected[name])
        assert_same_compact(warm[name]["logits"], expected[name])
        assert cold[name]["layer3"].shape == (len(batch), 64, 4, 4)  # taps stay whole
    # The cache holds the frames under compact-form keys: what `ekd warm` with soft_labels compact writes.
    identity = client.teachers()["a"].identity
    keys = [
        output_key(identity, "logits", "float16", 0, digest, form=COMPACT) for digest in input_digests(batch)
    ]
    stored = store.get_many(keys)
    assert all(isinstance(value, CompactLogits) for value in stored)
    assert_same_compact(CompactLogits.cat(stored), expected["a"])


def test_a_compact_frame_of_1000_classes_is_at_most_64_bytes_on_the_wire():
    assert frame_bytes(1000, entries_that_fit(1000)) <= COMPACT_BYTES


def test_compact_and_full_values_never_mix(serve, lmdb_store, reference):
    server = serve(store=lmdb_store)
    batch = images(11)
    with client_of(server, store=lmdb_store) as client:
        full = client.fetch(batch, ["a"], ["logits"])["a"]["logits"]
        assert server.running.servicer.wait_for_cache_writes()
    with client_of(server, store=lmdb_store) as client:
        compact = client.fetch(batch, ["a"], ["logits"], logits_form=COMPACT)["a"]["logits"]
        assert client.stats.cache_hits == 0  # the full values are not compact ones
    assert full.dtype == torch.float32 and full.shape == (len(batch), NUM_CLASSES)
    assert_same_compact(compact, compress(reference["a"].infer(batch, ["logits"])["logits"]))


def test_bypass_cache_recomputes_and_writes_nothing(serve, lmdb_store, reference):
    server = serve(store=lmdb_store)
    batch = images(12, batch=4)
    with client_of(server, store=lmdb_store) as client:
        identity = client.teachers()["a"].identity
        keys = [output_key(identity, "logits", "float16", 0, d) for d in input_digests(batch)]
        planted = torch.zeros(NUM_CLASSES, dtype=torch.float16)  # a well-formed but wrong value
        lmdb_store.put_many([(key, planted) for key in keys])
        calls = server.backend.teacher_calls()
        fresh = client.fetch(batch, ["a"], ["logits"], bypass_cache=True)["a"]["logits"]
        assert server.backend.teacher_calls() == calls + 1
        assert client.stats.cache_hits == client.stats.cache_misses == 0  # the client did not look
        assert server.running.servicer.wait_for_cache_writes()
    torch.testing.assert_close(fresh, reference["a"].infer(batch, ["logits"])["logits"], rtol=2e-3, atol=1e-3)
    assert all(torch.equal(value, planted) for value in lmdb_store.get_many(keys))  # nothing overwritten


def test_compact_requests_are_validated(serve):
    server = serve()
    batch = images(13, batch=2)
    with grpc.insecure_channel(server.address) as channel:
        stub = teacher_pb2_grpc.TeacherServiceStub(channel)

        def infer(**fields) -> grpc.RpcError:
            request = teacher_pb2.InferRequest(
                teachers=["a"],
                images=teacher_pb2.Tensor(
                    dtype=teacher_pb2.UINT8, shape=list(batch.shape), data=batch.numpy().tobytes()
                ),
                **fields,
            )
            with pytest.raises(grpc.RpcError) as raised:
                list(stub.Infer(request, timeout=20))
            return raised.value

        error = infer(logits_form=teacher_pb2.LOGITS_FORM_COMPACT, top_k=3)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_k" in error.details()
        error = infer(logits_form=7)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "logits_form" in error.details()


def test_logits_form_must_be_known(serve):
    with client_of(serve()) as client, pytest.raises(ValueError, match="logits_form"):
        client.fetch(images(14, batch=1), ["a"], ["logits"], logits_form="top5")


class StalledBackend(RecordingBackend):
    """Answers nothing until released: a stream whose deadline is the only way out."""

    def __init__(self, engines: dict[str, TeacherEngine]) -> None:
        super().__init__(engines)
        self.released = asyncio.Event()

    async def infer(self, name: str, images: torch.Tensor, outputs: list[str]) -> dict[str, torch.Tensor]:
        await self.released.wait()
        return await super().infer(name, images, outputs)


def test_a_stream_past_its_deadline_is_cancelled_by_the_client_itself(serve, checkpoints, monkeypatch):
    """The backstop for a deadline event that never arrives: with the backstop moved before the deadline
    (0.5 s into a 30 s one), the client cancels the stream itself and says CANCELLED, at once."""
    import services.rpc.client as client_module

    monkeypatch.setattr(client_module, "_DEADLINE_BACKSTOP_SECONDS", 0.5 - 30.0)
    server = serve(StalledBackend(load_engines(checkpoints)))
    started = time.monotonic()
    with (
        TeacherClient(server.address, timeout_seconds=30.0, retries=0) as client,
        pytest.raises(TeacherServiceError) as raised,
    ):
        client.fetch(images(0), ["a"], ["logits"])
    assert raised.value.code == grpc.StatusCode.CANCELLED and time.monotonic() - started < 20
