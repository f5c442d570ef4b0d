"""The teacher gRPC server over real 127.0.0.1 sockets, with real LMDB stores in tmp_path and a real
redis-server.

Each server runs on its own event loop in a background thread, as a deployed server runs apart from its
clients; the tests talk to it through ordinary blocking stubs, each call with a deadline.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Callable, Iterator

import grpc
import pytest
import redis
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services._generated import TEACHER_SERVICE_FULL_NAME, teacher_pb2, teacher_pb2_grpc
from services.cache import input_digest, open_store, output_key
from services.formats.codec import DTYPES, DTYPES_BY_PROTO_NAME, tensor_from_bytes
from services.rpc.backends import BackendUnavailableError, LocalBackend
from services.rpc.limits import ServiceLimits
from services.rpc.metrics import start_metrics_server
from services.rpc.server import BackgroundServer
from services.teachers.engine import TeacherEngine
from services.teachers.spec import Preprocessing
from services.teachers.zoo import create_teacher, save_teacher_checkpoint

pytestmark = pytest.mark.integration

DEADLINE_SECONDS = 20.0
NUM_CLASSES = 10
PREPROCESSING = Preprocessing.cifar(16)
TAP_SHAPES = {"layer1": (16, 16, 16), "layer2": (32, 8, 8), "layer3": (64, 4, 4)}


# ---- teachers and servers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TeacherEngine]:
    """Teachers "a" and "b" loaded from checkpoints, and "random": randomly initialised, no weights_sha256."""
    directory = tmp_path_factory.mktemp("teachers")
    engines = {}
    for seed, name in enumerate(("a", "b")):
        torch.manual_seed(seed)
        untrained = create_teacher("cifar_resnet20", NUM_CLASSES, preprocessing=PREPROCESSING)
        checkpoint = directory / f"{name}.pt"
        save_teacher_checkpoint(checkpoint, untrained, "cifar_resnet20", NUM_CLASSES, PREPROCESSING)
        engines[name] = TeacherEngine(create_teacher("cifar_resnet20", NUM_CLASSES, checkpoint=checkpoint))
    torch.manual_seed(2)
    engines["random"] = TeacherEngine(
        create_teacher("cifar_resnet20", NUM_CLASSES, preprocessing=PREPROCESSING)
    )
    assert engines["a"].spec.weights_sha256 and engines["random"].spec.weights_sha256 is None
    return engines


class ServerThread(BackgroundServer):
    """A background teacher server and a blocking stub to it."""

    def __init__(self, backend, **options) -> None:
        super().__init__(backend, timeout_seconds=DEADLINE_SECONDS, **options)
        self.backend = backend
        self.channel = grpc.insecure_channel(self.address)
        self.stub = teacher_pb2_grpc.TeacherServiceStub(self.channel)

    def metric(self, name: str, **labels: str) -> float:
        return self.running.metrics.registry.get_sample_value(name, labels) or 0.0

    def close(self) -> None:
        self.channel.close()
        super().close()


@pytest.fixture
def serve(engines) -> Iterator[Callable[..., ServerThread]]:
    """Start servers of the test's engines: `serve(store=..., max_batch_size=...)`; stopped after the test."""
    servers = []

    def start(backend=None, **options) -> ServerThread:
        servers.append(ServerThread(backend if backend is not None else LocalBackend(engines), **options))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


# ---- requests and responses ------------------------------------------------------------------------------


def images(seed: int, batch: int = 8, channels: int = 3, size: int = 16) -> torch.Tensor:
    return torch.randint(
        0,
        256,
        (batch, channels, size, size),
        dtype=torch.uint8,
        generator=torch.Generator().manual_seed(seed),
    )


def image_tensor(batch: torch.Tensor) -> teacher_pb2.Tensor:
    return teacher_pb2.Tensor(dtype=teacher_pb2.UINT8, shape=list(batch.shape), data=batch.numpy().tobytes())


def infer(
    server: ServerThread, teachers: list[str], batch: torch.Tensor, **fields
) -> list[teacher_pb2.InferResponse]:
    request = teacher_pb2.InferRequest(teachers=teachers, images=image_tensor(batch), **fields)
    responses = list(server.stub.Infer(request, timeout=DEADLINE_SECONDS))
    # The servicer writes the cache in the background; the tests read it right after a request.
    assert server.running.servicer.wait_for_cache_writes(DEADLINE_SECONDS)
    return responses


def decode(message: teacher_pb2.Tensor) -> torch.Tensor:
    return tensor_from_bytes(
        message.data, DTYPES_BY_PROTO_NAME[teacher_pb2.DType.Name(message.dtype)], message.shape
    )


def assemble(
    responses: list[teacher_pb2.InferResponse],
    teacher: str,
    pick: Callable[[teacher_pb2.InferResponse], teacher_pb2.Tensor],
) -> torch.Tensor:
    """One teacher's output for the whole batch from its chunks, checking they cover it exactly once."""
    chunks = sorted((r for r in responses if r.teacher == teacher), key=lambda r: r.start)
    assert [r.start for r in chunks] == [sum(c.count for c in chunks[:i]) for i in range(len(chunks))]
    tensors = [decode(pick(r)) for r in chunks]
    assert all(t.shape[0] == r.count for t, r in zip(tensors, chunks))
    return torch.cat(tensors)


def output(name: str) -> Callable[[teacher_pb2.InferResponse], teacher_pb2.Tensor]:
    return lambda response: response.outputs[name]


def cached(responses: list[teacher_pb2.InferResponse], teacher: str) -> list[bool]:
    chunks = sorted((r for r in responses if r.teacher == teacher), key=lambda r: r.start)
    return [flag for r in chunks for flag in r.cached]


# ---- ListTeachers, health, reflection, metrics endpoint ----------------------------------------------------


def test_list_teachers_describes_every_hosted_teacher(serve, engines):
    server = serve(limits=ServiceLimits(max_batch_size=100, max_message_bytes=1 << 20))
    listing = server.stub.ListTeachers(teacher_pb2.ListTeachersRequest(), timeout=DEADLINE_SECONDS)
    assert [t.name for t in listing.teachers] == ["a", "b", "random"]
    assert (listing.max_batch_size, listing.max_message_bytes) == (100, 1 << 20)
    for info in listing.teachers:
        spec = engines[info.name].spec
        assert (info.architecture, info.num_classes, info.identity) == ("cifar_resnet20", 10, spec.identity)
        assert info.weights_sha256 == (spec.weights_sha256 or "")
        assert (info.input.channels, info.input.input_size, info.input.dtype) == (3, 16, teacher_pb2.UINT8)
        assert list(info.input.mean) == pytest.approx(PREPROCESSING.mean)
        assert list(info.input.std) == pytest.approx(PREPROCESSING.std)
        assert {t.name: (t.channels, t.height, t.width) for t in info.taps} == TAP_SHAPES
        assert [t.name for t in info.taps] == ["layer1", "layer2", "layer3"]
        assert list(info.output_dtypes) == [teacher_pb2.FLOAT32, teacher_pb2.FLOAT16, teacher_pb2.BFLOAT16]
    assert listing.teachers[0].weights_sha256 != listing.teachers[1].weights_sha256
    assert listing.teachers[2].weights_sha256 == ""


def test_health_reports_serving_and_reflection_lists_the_service(serve):
    server = serve()
    health = health_pb2_grpc.HealthStub(server.channel)
    for service in ("", TEACHER_SERVICE_FULL_NAME):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE_SECONDS)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    answers = list(
        reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=DEADLINE_SECONDS
        )
    )
    listed = {service.name for service in answers[0].list_services_response.service}
    assert {TEACHER_SERVICE_FULL_NAME, "grpc.health.v1.Health"} <= listed


def test_metrics_move_and_are_exported_over_http(serve, tmp_path):
    server = serve(store=open_store(str(tmp_path / "cache")))
    batch = images(30, batch=4)
    infer(server, ["a"], batch)
    infer(server, ["a"], batch)
    with pytest.raises(grpc.RpcError):
        infer(server, ["a"], batch, top_k=99)
    assert server.metric("ekd_requests_total", teacher="a") == 3
    assert server.metric("ekd_request_errors_total", teacher="a", code="INVALID_ARGUMENT") == 1
    assert server.metric("ekd_cache_misses_total", teacher="a") == 4
    assert server.metric("ekd_cache_hits_total", teacher="a") == 4
    assert server.metric("ekd_batch_size_count", teacher="a") == 1
    assert server.metric("ekd_batch_size_sum", teacher="a") == 4
    assert server.metric("ekd_inference_seconds_count", teacher="a") == 1
    assert server.metric("ekd_request_seconds_count", method="Infer") == 3
    assert server.metric("ekd_served_bytes_total", teacher="a") > 2 * 4 * NUM_CLASSES * 2
    http_server, _ = start_metrics_server(server.running.metrics, 0)
    try:
        url = f"http://127.0.0.1:{http_server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=DEADLINE_SECONDS) as page:
            text = page.read().decode()
    finally:
        http_server.shutdown()
        http_server.server_close()
    assert 'ekd_requests_total{teacher="a"} 3.0' in text
    assert 'ekd_cache_hits_total{teacher="a"} 4.0' in text


# ---- outputs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["FLOAT32", "FLOAT16", "BFLOAT16", "DTYPE_UNSPECIFIED"])
def test_served_logits_and_taps_equal_the_engine(serve, engines, dtype):
    server = serve()
    batch = images(1)
    expected = engines["a"].infer(batch, ["logits", "layer2"])
    responses = infer(
        server, ["a"], batch, outputs=["logits", "layer2"], output_dtype=teacher_pb2.DType.Value(dtype)
    )
    served_dtype = DTYPES[DTYPES_BY_PROTO_NAME.get(dtype, "float16")]
    for name in ("logits", "layer2"):
        served = assemble(responses, "a", output(name))
        assert served.dtype == served_dtype and served.shape == expected[name].shape
        if dtype == "FLOAT32":
            assert torch.equal(served, expected[name])
        else:
            torch.testing.assert_close(served.float(), expected[name], rtol=1e-2, atol=1e-2)
            assert torch.equal(served, expected[name].to(served_dtype))
    assert cached(responses, "a") == [False] * 8


def test_second_identical_request_is_answered_from_the_cache(serve, store):
    server = serve(store=store)
    batch = images(2)
    first = infer(server, ["a"], batch, outputs=["logits", "layer3"])
    calls = server.backend.teacher_calls()
    second = infer(server, ["a"], batch, outputs=["logits", "layer3"])
    assert server.backend.teacher_calls() == calls
    assert cached(first, "a") == [False] * 8 and cached(second, "a") == [True] * 8
    for name in ("logits", "layer3"):
        assert torch.equal(assemble(first, "a", output(name)), assemble(second, "a", output(name)))
    assert store.stats.hits == 16 and store.stats.puts == 16


def test_partially_cached_batch_computes_only_the_misses(serve, engines, tmp_path):
    server = serve(store=open_store(str(tmp_path / "cache")))
    batch = images(3)
    seen = [1, 4, 6]
    infer(server, ["a"], batch[seen])
    calls = server.backend.teacher_calls()
    responses = infer(server, ["a"], batch)
    assert server.backend.teacher_calls() == calls + 1
    assert server.metric("ekd_batch_size_sum", teacher="a") == 3 + 5
    assert cached(responses, "a") == [i in seen for i in range(8)]
    expected = engines["a"].infer(batch, ["logits"])["logits"]
    torch.testing.assert_close(
        assemble(responses, "a", output("logits")).float(), expected, rtol=1e-2, atol=1e-2
    )


def test_ensemble_streams_every_teacher_and_chunks_reassemble(serve, engines):
    server = serve()
    batch = images(4)
    responses = infer(server, ["a", "b"], batch, chunk_size=3, output_dtype=teacher_pb2.FLOAT32)
    assert sorted((r.teacher, r.start, r.count) for r in responses) == [
        (teacher, start, count) for teacher in ("a", "b") for start, count in ((0, 3), (3, 3), (6, 2))
    ]
    served = {teacher: assemble(responses, teacher, output("logits")) for teacher in ("a", "b")}
    for teacher in ("a", "b"):
        assert torch.equal(served[teacher], engines[teacher].infer(batch, ["logits"])["logits"])
    assert not torch.equal(served["a"], served["b"])


def test_top_k_values_and_indices_equal_torch_topk_and_are_cached(serve, engines, tmp_path):
    server = serve(store=open_store(str(tmp_path / "cache")))
    batch = images(5)
    logits = engines["a"].infer(batch, ["logits"])["logits"]
    top = torch.topk(logits, 3, dim=1)
    for expect_cached in (False, True):
        responses = infer(server, ["a"], batch, top_k=3, output_dtype=teacher_pb2.FLOAT32, chunk_size=5)
        assert all("logits" not in r.outputs and r.HasField("logits_top_k") for r in responses)
        assert torch.equal(assemble(responses, "a", lambda r: r.logits_top_k.values), top.values)
        assert torch.equal(assemble(responses, "a", lambda r: r.logits_top_k.indices), top.indices)
        assert cached(responses, "a") == [expect_cached] * 8
    half = infer(server, ["a"], batch, top_k=3, outputs=["logits", "layer3"])
    assert torch.equal(assemble(half, "a", lambda r: r.logits_top_k.values), top.values.half())
    assert torch.equal(assemble(half, "a", lambda r: r.logits_top_k.indices), top.indices)
    assert assemble(half, "a", output("layer3")).shape == (8, *TAP_SHAPES["layer3"])


def test_chunks_shrink_to_fit_the_message_size_limit(serve):
    limit = 12 * 1024
    server = serve(limits=ServiceLimits(max_message_bytes=limit))
    batch = images(6)
    responses = infer(server, ["a"], batch, outputs=["layer3"])  # 2 KiB per sample in float16
    assert len(responses) > 1 and all(r.ByteSize() <= limit for r in responses)
    assert assemble(responses, "a", output("layer3")).shape == (8, *TAP_SHAPES["layer3"])
    assert [r.count for r in infer(server, ["a"], batch, chunk_size=3)] == [3, 3, 2]
    with pytest.raises(grpc.RpcError) as failure:
        infer(server, ["a"], batch, outputs=["layer1"], output_dtype=teacher_pb2.FLOAT32)  # 16 KiB a sample
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"more than fit in max_message_bytes={limit}" in failure.value.details()


def test_teacher_without_weights_sha256_is_never_cached(serve, tmp_path):
    store = open_store(str(tmp_path / "cache"))
    server = serve(store=store)
    batch = images(7)
    infer(server, ["a", "random"], batch)
    calls = server.backend.teacher_calls()
    responses = infer(server, ["a", "random"], batch)
    assert server.backend.teacher_calls() == calls + 1  # "random" ran again, "a" came from the cache
    assert cached(responses, "a") == [True] * 8 and cached(responses, "random") == [False] * 8
    assert store.stats.puts == 8  # a's logits only
    assert server.metric("ekd_cache_misses_total", teacher="random") == 0


# ---- the cache failing ------------------------------------------------------------------------------------


def test_unreachable_cache_falls_back_to_computing(serve, engines, start_redis_server):
    redis_server = start_redis_server()
    server = serve(store=open_store(redis_server.url))
    redis_server.stop()
    batch = images(8)
    responses = infer(server, ["a"], batch, output_dtype=teacher_pb2.FLOAT32)
    assert cached(responses, "a") == [False] * 8
    expected = engines["a"].infer(batch, ["logits"])["logits"]
    assert torch.equal(assemble(responses, "a", output("logits")), expected)
    assert server.metric("ekd_cache_errors_total", teacher="a", operation="get") == 1
    assert server.metric("ekd_cache_errors_total", teacher="a", operation="put") == 1


def test_corrupt_cache_value_is_counted_and_recomputed(serve, engines, redis_url, request):
    prefix = f"{request.node.name}:"
    server = serve(store=open_store(redis_url, key_prefix=prefix))
    batch = images(9)
    first = infer(server, ["a"], batch)
    key = output_key(engines["a"].spec.identity, "logits", "float16", 0, input_digest(batch[2]))
    with redis.Redis.from_url(redis_url) as raw:
        assert raw.exists(prefix.encode() + key)
        raw.set(prefix.encode() + key, b"not a framed tensor")
    second = infer(server, ["a"], batch)
    assert cached(second, "a") == [i != 2 for i in range(8)]
    assert server.metric("ekd_cache_corrupt_total", teacher="a") == 1
    assert torch.equal(assemble(first, "a", output("logits")), assemble(second, "a", output("logits")))


# ---- errors ------------------------------------------------------------------------------------------------


def _images_with(**fields) -> teacher_pb2.Tensor:
    tensor = image_tensor(images(10, batch=2))
    for name, value in fields.items():
        if name == "shape":
            del tensor.shape[:]
            tensor.shape.extend(value)
        else:
            setattr(tensor, name, value)
    return tensor


SPEC = r"expected images uint8 \[B, 3, H, W\] with 1 <= B <= 4 and H, W >= 1"
BAD_REQUESTS = {
    "unknown teacher": (
        dict(teachers=["a", "nope"]),
        grpc.StatusCode.NOT_FOUND,
        r"^unknown teachers \['nope'\]; hosted teachers: a, b, random$",
    ),
    "no teacher": (
        dict(teachers=[]),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"^no teachers requested; hosted teachers: a, b, random$",
    ),
    "duplicate teacher": (
        dict(teachers=["a", "b", "a"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"^duplicate teachers \['a'\]",
    ),
    "unknown output": (
        dict(outputs=["logits", "layer9"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"^teacher 'a' has no outputs \['layer9'\]; "
        r"available outputs of 'a': logits, layer1, layer2, layer3$",
    ),
    "duplicate output": (
        dict(outputs=["layer1", "layer1"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"^duplicate outputs \['layer1'\]",
    ),
    "float images": (
        dict(images=_images_with(dtype=teacher_pb2.FLOAT32)),
        grpc.StatusCode.INVALID_ARGUMENT,
        SPEC + r".*; got dtype FLOAT32$",
    ),
    "no images": (
        dict(images=teacher_pb2.Tensor()),
        grpc.StatusCode.INVALID_ARGUMENT,
        SPEC + r".*; got dtype DTYPE_UNSPECIFIED$",
    ),
    "3-D images": (
        dict(images=_images_with(shape=[6, 16, 16])),
        grpc.StatusCode.INVALID_ARGUMENT,
        SPEC + r".*; got 3 dimensions \(shape \[6, 16, 16\]\)$",
    ),
    "wrong channels": (
        dict(images=_images_with(shape=[6, 1, 16, 16])),
        grpc.StatusCode.INVALID_ARGUMENT,
        SPEC + r".*; got 1 channels",
    ),
    "wrong byte length": (
        dict(images=_images_with(data=b"\0" * 100)),
        grpc.StatusCode.INVALID_ARGUMENT,
        SPEC + r".*; got 100 bytes for shape \[2, 3, 16, 16\], which needs 1536$",
    ),
    "negative dimension": (
        dict(images=_images_with(shape=[-2, 3, 16, 16])),
        grpc.StatusCode.INVALID_ARGUMENT,
        SPEC + r".*; got a negative dimension",
    ),
    "empty batch": (
        dict(images=_images_with(shape=[0, 3, 16, 16], data=b"")),
        grpc.StatusCode.INVALID_ARGUMENT,
        SPEC + r".*; got an empty batch \(shape \[0, 3, 16, 16\]\)$",
    ),
    "batch too large": (
        dict(images=image_tensor(images(11, batch=5))),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        r"^batch of 5 images exceeds max_batch_size=4",
    ),
    "integer output dtype": (
        dict(output_dtype=teacher_pb2.UINT8),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"^output_dtype UINT8 is not allowed; allowed: FLOAT32, FLOAT16, BFLOAT16",
    ),
    "unknown output dtype": (
        dict(output_dtype=99),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"^output_dtype <unknown DType value 99> is not allowed",
    ),
    "top_k above classes": (
        dict(top_k=11),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"^top_k=11 exceeds the number of classes; allowed: 0 \(full logits\) to 10",
    ),
}


@pytest.fixture(scope="module")
def strict_server(engines) -> Iterator[ServerThread]:
    server = ServerThread(LocalBackend(engines), limits=ServiceLimits(max_batch_size=4))
    yield server
    server.close()


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_request_gets_its_status_and_the_server_keeps_serving(strict_server, case):
    fields, code, message = BAD_REQUESTS[case]
    request = teacher_pb2.InferRequest(**{"teachers": ["a"], "images": _images_with(), **fields})
    label = {"teacher": "a" if "a" in request.teachers else "", "code": code.name}
    errors = strict_server.metric("ekd_request_errors_total", **label)
    with pytest.raises(grpc.RpcError) as failure:
        list(strict_server.stub.Infer(request, timeout=DEADLINE_SECONDS))
    assert failure.value.code() == code
    assert re.search(message, failure.value.details()), failure.value.details()
    assert strict_server.metric("ekd_request_errors_total", **label) == errors + 1
    good = infer(strict_server, ["a"], images(12, batch=2))
    assert assemble(good, "a", output("logits")).shape == (2, NUM_CLASSES)


def test_request_naming_no_hosted_teacher_is_counted_without_a_teacher(strict_server):
    errors = strict_server.metric("ekd_request_errors_total", teacher="", code="NOT_FOUND")
    with pytest.raises(grpc.RpcError):
        infer(strict_server, ["nope"], images(13, batch=2))
    assert strict_server.metric("ekd_request_errors_total", teacher="", code="NOT_FOUND") == errors + 1
    assert strict_server.metric("ekd_requests_total", teacher="nope") == 0


class FailingBackend(LocalBackend):
    """Real engines whose forward passes fail with `error`."""

    def __init__(self, engines, error: Exception) -> None:
        super().__init__(engines)
        self.error = error

    async def infer(self, name, images, outputs):
        raise self.error


@pytest.mark.parametrize(
    "error, code, message",
    [
        (
            RuntimeError("CUDA error: out of memory"),
            grpc.StatusCode.INTERNAL,
            "teacher 'a' failed: RuntimeError: CUDA error: out of memory",
        ),
        (
            BackendUnavailableError("replica restarting"),
            grpc.StatusCode.UNAVAILABLE,
            "teacher 'a' is unavailable: replica restarting; retry later",
        ),
    ],
)
def test_failing_teacher_fails_only_its_request(serve, engines, error, code, message):
    server = serve(FailingBackend({"a": engines["a"]}, error))
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as failure:
            infer(server, ["a"], images(14, batch=2))
        assert (failure.value.code(), failure.value.details()) == (code, message)
    listing = server.stub.ListTeachers(teacher_pb2.ListTeachersRequest(), timeout=DEADLINE_SECONDS)
    assert [t.name for t in listing.teachers] == ["a"]
    assert server.metric("ekd_request_errors_total", teacher="a", code=code.name) == 2
