"""The gRPC contract: generated code matches proto/, messages round-trip, stubs work over a real socket."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from services._generated import TEACHER_SERVICE_FULL_NAME, teacher_pb2, teacher_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
GENERATED_DIR = REPO_ROOT / "services" / "_generated"
GENERATED_FILES = ["teacher_pb2.py", "teacher_pb2.pyi", "teacher_pb2_grpc.py"]
RPC_TIMEOUT_S = 5.0

sys.path.insert(0, str(REPO_ROOT / "scripts"))
from generate_proto import without_version_stamps  # noqa: E402


def test_version_stamps_are_all_that_is_masked() -> None:
    committed = (GENERATED_DIR / "teacher_pb2.py").read_bytes()
    masked = without_version_stamps(committed)

    assert b"# Protobuf Python Version: <version>" in masked
    assert masked.count(b"<version>") == 2
    assert masked.replace(b"<version>", b"") != committed
    grpc_code = without_version_stamps((GENERATED_DIR / "teacher_pb2_grpc.py").read_bytes())
    assert b"GRPC_GENERATED_VERSION = <version>" in grpc_code
    # A change of the proto still shows: the service's name is not a stamp.
    assert without_version_stamps(committed.replace(b"TeacherService", b"OtherService")) != masked


def test_committed_generated_code_matches_proto(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "generate_proto.py"), "--output-dir", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == GENERATED_FILES
    for name in GENERATED_FILES:
        regenerated = without_version_stamps((tmp_path / name).read_bytes())
        assert regenerated == without_version_stamps((GENERATED_DIR / name).read_bytes()), (
            f"services/_generated/{name} is out of date with proto/ekd/v1/teacher.proto; "
            "run `python scripts/generate_proto.py` and commit the result"
        )


def test_generated_service_module_imports_message_module_relatively() -> None:
    source = (GENERATED_DIR / "teacher_pb2_grpc.py").read_text()
    assert "from . import teacher_pb2 as" in source
    assert "from ekd.v1 import" not in source


def test_service_full_name_is_exported() -> None:
    assert TEACHER_SERVICE_FULL_NAME == "ekd.v1.TeacherService"


def test_dtype_enum_values() -> None:
    assert {name: teacher_pb2.DType.Value(name) for name in teacher_pb2.DType.keys()} == {  # noqa: SIM118
        "DTYPE_UNSPECIFIED": 0,
        "UINT8": 1,
        "FLOAT32": 2,
        "FLOAT16": 3,
        "BFLOAT16": 4,
        "INT64": 5,
    }


def test_tensor_round_trips_raw_uint8_bytes() -> None:
    pixels = bytes(range(2 * 3 * 2 * 2))
    tensor = teacher_pb2.Tensor(dtype=teacher_pb2.UINT8, shape=[2, 3, 2, 2], data=pixels)

    decoded = teacher_pb2.Tensor.FromString(tensor.SerializeToString())

    assert decoded == tensor
    assert decoded.dtype == teacher_pb2.UINT8
    assert list(decoded.shape) == [2, 3, 2, 2]
    assert decoded.data == pixels


def test_infer_request_round_trips_with_two_teachers() -> None:
    request = teacher_pb2.InferRequest(
        teachers=["resnet56_a", "resnet56_b"],
        outputs=["logits", "stage3"],
        output_dtype=teacher_pb2.BFLOAT16,
        top_k=5,
        images=teacher_pb2.Tensor(dtype=teacher_pb2.UINT8, shape=[1, 1, 2, 2], data=b"\x00\x01\xfe\xff"),
        chunk_size=64,
        request_id="req-1",
    )

    decoded = teacher_pb2.InferRequest.FromString(request.SerializeToString())

    assert decoded == request
    assert list(decoded.teachers) == ["resnet56_a", "resnet56_b"]
    assert list(decoded.outputs) == ["logits", "stage3"]
    assert decoded.images.data == b"\x00\x01\xfe\xff"


def test_infer_request_defaults_mean_server_choices() -> None:
    request = teacher_pb2.InferRequest()

    assert request.output_dtype == teacher_pb2.DTYPE_UNSPECIFIED
    assert request.top_k == 0
    assert request.chunk_size == 0
    assert list(request.outputs) == []


def test_infer_response_round_trips_map_outputs_and_top_k() -> None:
    logits = np.array([[1.5, -2.0], [0.25, 3.0]], dtype="<f4")
    indices = np.array([[0], [1]], dtype="<i8")
    response = teacher_pb2.InferResponse(
        teacher="resnet56_a",
        start=32,
        count=2,
        outputs={
            "logits": teacher_pb2.Tensor(dtype=teacher_pb2.FLOAT32, shape=[2, 2], data=logits.tobytes()),
            "stage3": teacher_pb2.Tensor(dtype=teacher_pb2.FLOAT16, shape=[2, 1, 1, 1], data=b"\x00<\x00<"),
        },
        logits_top_k=teacher_pb2.TopK(
            values=teacher_pb2.Tensor(dtype=teacher_pb2.FLOAT32, shape=[2, 1], data=logits.max(1).tobytes()),
            indices=teacher_pb2.Tensor(dtype=teacher_pb2.INT64, shape=[2, 1], data=indices.tobytes()),
        ),
        cached=[True, False],
    )

    decoded = teacher_pb2.InferResponse.FromString(response.SerializeToString())

    assert decoded == response
    assert sorted(decoded.outputs) == ["logits", "stage3"]
    np.testing.assert_array_equal(
        np.frombuffer(decoded.outputs["logits"].data, dtype="<f4").reshape(2, 2), logits
    )
    np.testing.assert_array_equal(np.frombuffer(decoded.logits_top_k.indices.data, dtype="<i8"), [0, 1])
    assert list(decoded.cached) == [True, False]


def test_service_descriptor_has_unary_list_and_server_streaming_infer() -> None:
    service = teacher_pb2.DESCRIPTOR.services_by_name["TeacherService"]
    methods = {method.name: method for method in service.methods}

    assert sorted(methods) == ["Infer", "ListTeachers"]
    list_teachers, infer = methods["ListTeachers"], methods["Infer"]
    assert (list_teachers.client_streaming, list_teachers.server_streaming) == (False, False)
    assert list_teachers.input_type.full_name == "ekd.v1.ListTeachersRequest"
    assert list_teachers.output_type.full_name == "ekd.v1.ListTeachersResponse"
    assert (infer.client_streaming, infer.server_streaming) == (False, True)
    assert infer.input_type.full_name == "ekd.v1.InferRequest"
    assert infer.output_type.full_name == "ekd.v1.InferResponse"


class PixelSumServicer(teacher_pb2_grpc.TeacherServiceServicer):
    """Serves teachers "a" and "b" whose single logit is the sample's pixel sum (times 1 or 2)."""

    SCALES = {"a": 1.0, "b": 2.0}

    def ListTeachers(self, request, context):
        return teacher_pb2.ListTeachersResponse(
            teachers=[
                teacher_pb2.TeacherInfo(name=name, architecture="pixel_sum", num_classes=1)
                for name in sorted(self.SCALES)
            ],
            max_batch_size=8,
            max_message_bytes=1 << 20,
        )

    def Infer(self, request, context):
        unknown = [name for name in request.teachers if name not in self.SCALES]
        if unknown:
            context.abort(
                grpc.StatusCode.NOT_FOUND, f"unknown teachers {unknown}; known: {sorted(self.SCALES)}"
            )
        images = np.frombuffer(request.images.data, dtype=np.uint8).reshape(tuple(request.images.shape))
        pixel_sums = images.reshape(images.shape[0], -1).sum(axis=1).astype("<f4")
        for start in range(0, images.shape[0], request.chunk_size):
            for name in request.teachers:
                chunk = pixel_sums[start : start + request.chunk_size] * self.SCALES[name]
                logits = teacher_pb2.Tensor(
                    dtype=teacher_pb2.FLOAT32, shape=[len(chunk), 1], data=chunk.astype("<f4").tobytes()
                )
                yield teacher_pb2.InferResponse(
                    teacher=name,
                    start=start,
                    count=len(chunk),
                    outputs={"logits": logits},
                    cached=[False] * len(chunk),
                )


@pytest.fixture
def channel() -> Iterator[grpc.Channel]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    teacher_pb2_grpc.add_TeacherServiceServicer_to_server(PixelSumServicer(), server)
    reflection.enable_server_reflection((TEACHER_SERVICE_FULL_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as client_channel:
            yield client_channel
    finally:
        server.stop(grace=None)


def test_list_teachers_over_a_real_server(channel: grpc.Channel) -> None:
    stub = teacher_pb2_grpc.TeacherServiceStub(channel)

    response = stub.ListTeachers(teacher_pb2.ListTeachersRequest(), timeout=RPC_TIMEOUT_S)

    assert [teacher.name for teacher in response.teachers] == ["a", "b"]
    assert response.max_batch_size == 8


def test_infer_streams_chunks_that_reassemble_by_teacher_and_start(channel: grpc.Channel) -> None:
    stub = teacher_pb2_grpc.TeacherServiceStub(channel)
    images = np.arange(5 * 1 * 2 * 2, dtype=np.uint8).reshape(5, 1, 2, 2)
    request = teacher_pb2.InferRequest(
        teachers=["a", "b"],
        outputs=["logits"],
        images=teacher_pb2.Tensor(dtype=teacher_pb2.UINT8, shape=list(images.shape), data=images.tobytes()),
        chunk_size=2,
    )

    responses = list(stub.Infer(request, timeout=RPC_TIMEOUT_S))

    assert sorted((r.teacher, r.start, r.count) for r in responses) == [
        ("a", 0, 2),
        ("a", 2, 2),
        ("a", 4, 1),
        ("b", 0, 2),
        ("b", 2, 2),
        ("b", 4, 1),
    ]
    by_teacher = {
        name: np.concatenate(
            [
                np.frombuffer(r.outputs["logits"].data, dtype="<f4")
                for r in sorted(responses, key=lambda r: r.start)
                if r.teacher == name
            ]
        )
        for name in ("a", "b")
    }
    # Pixel sums of the five 2x2 samples 0..3, 4..7, ...: 6, 22, 38, 54, 70.
    np.testing.assert_array_equal(by_teacher["a"], [6.0, 22.0, 38.0, 54.0, 70.0])
    np.testing.assert_array_equal(by_teacher["b"], [12.0, 44.0, 76.0, 108.0, 140.0])


def test_infer_error_status_reaches_the_client(channel: grpc.Channel) -> None:
    stub = teacher_pb2_grpc.TeacherServiceStub(channel)
    request = teacher_pb2.InferRequest(
        teachers=["missing"],
        images=teacher_pb2.Tensor(dtype=teacher_pb2.UINT8, shape=[1, 1, 1, 1], data=b"\x00"),
        chunk_size=1,
    )

    with pytest.raises(grpc.RpcError) as error:
        list(stub.Infer(request, timeout=RPC_TIMEOUT_S))

    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown teachers ['missing']" in error.value.details()


def test_reflection_finds_the_service_by_its_exported_full_name(channel: grpc.Channel) -> None:
    database = ProtoReflectionDescriptorDatabase(channel)

    assert TEACHER_SERVICE_FULL_NAME in database.get_services()
    service_file = database.FindFileContainingSymbol(TEACHER_SERVICE_FULL_NAME)
    assert service_file.name == "ekd/v1/teacher.proto"
