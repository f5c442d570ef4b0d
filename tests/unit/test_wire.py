"""The InferRequest wire form of services.rpc.wire is protobuf's: what it writes protobuf reads as the same
message, and what protobuf writes it reads, with the image bytes as a view instead of copies."""

import pytest
import torch
from google.protobuf.message import DecodeError

from services._generated import teacher_pb2
from services.formats.codec import CodecError, decode_into, tensor_to_bytes
from services.rpc.wire import OutgoingInferRequest, parse_infer_request, serialize_infer_request


def images(batch: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch)
    return torch.randint(0, 256, (batch, 3, 5, 7), dtype=torch.uint8, generator=generator)


def header() -> teacher_pb2.InferRequest:
    return teacher_pb2.InferRequest(
        teachers=["a", "b"],
        outputs=["logits", "layer3"],
        output_dtype=teacher_pb2.FLOAT16,
        top_k=2,
        chunk_size=7,
        request_id="r-1",
    )


def as_protobuf(message: teacher_pb2.InferRequest, batch: torch.Tensor) -> teacher_pb2.InferRequest:
    whole = teacher_pb2.InferRequest()
    whole.CopyFrom(message)
    whole.images.dtype = teacher_pb2.UINT8
    whole.images.shape.extend(batch.shape)
    whole.images.data = batch.numpy().tobytes()
    return whole


@pytest.mark.parametrize("batch", [1, 3, 300])
def test_serialized_request_is_the_protobuf_message(batch):
    pixels = images(batch)
    outgoing = OutgoingInferRequest(header(), pixels)

    data = serialize_infer_request(outgoing)

    assert len(data) == outgoing.byte_size()
    assert teacher_pb2.InferRequest.FromString(data) == as_protobuf(header(), pixels)


def test_parsed_request_holds_the_fields_and_a_view_of_the_image_bytes():
    pixels = images()
    data = serialize_infer_request(OutgoingInferRequest(header(), pixels))

    received = parse_infer_request(data)

    assert bytes(received.image_data) == pixels.numpy().tobytes()
    assert received.image_data.obj is data  # a view into the received buffer, not a copy
    expected = as_protobuf(header(), pixels)
    expected.images.ClearField("data")
    assert received.message == expected


def test_protobuf_serialized_requests_parse_too():
    pixels = images()
    received = parse_infer_request(as_protobuf(header(), pixels).SerializeToString())
    assert bytes(received.image_data) == pixels.numpy().tobytes()
    assert list(received.message.images.shape) == list(pixels.shape)

    no_images = parse_infer_request(teacher_pb2.InferRequest(teachers=["a"]).SerializeToString())
    assert not no_images.message.HasField("images") and len(no_images.image_data) == 0


def test_repeated_images_field_merges_as_protobuf_does():
    first, second = images(2), images(3)
    data = (
        as_protobuf(header(), first).SerializeToString() + as_protobuf(header(), second).SerializeToString()
    )

    received = parse_infer_request(data)

    merged = teacher_pb2.InferRequest.FromString(data)
    assert bytes(received.image_data) == merged.images.data
    assert list(received.message.images.shape) == list(merged.images.shape)


@pytest.mark.parametrize("cut", [1, 5, 40])
def test_truncated_request_is_a_decode_error(cut):
    data = serialize_infer_request(OutgoingInferRequest(header(), images()))
    with pytest.raises(DecodeError):
        parse_infer_request(data[:-cut])


def test_outgoing_request_needs_contiguous_uint8_images_and_no_images_field():
    with pytest.raises(ValueError, match="contiguous uint8"):
        OutgoingInferRequest(header(), images().float())
    with pytest.raises(ValueError, match="contiguous uint8"):
        OutgoingInferRequest(header(), images().transpose(2, 3))
    with pytest.raises(ValueError, match="unset"):
        OutgoingInferRequest(as_protobuf(header(), images()), images())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_into_writes_the_float32_rows_it_is_given(dtype):
    values = torch.randn(4, 6).to(dtype)
    target = torch.zeros(10, 6)

    name, shape, data = tensor_to_bytes(values)
    decode_into(target[3:7], data, name, shape)

    torch.testing.assert_close(target[3:7], values.float(), rtol=0, atol=0)
    assert not target[:3].any() and not target[7:].any()


def test_decode_into_checks_length_and_shape():
    target = torch.zeros(2, 3)
    with pytest.raises(CodecError, match="needs 24 bytes"):
        decode_into(target, b"\0" * 20, "float32", (2, 3))
    with pytest.raises(CodecError, match="into one of shape"):
        decode_into(target, b"\0" * 24, "float32", (3, 2))
