"""InferRequest on the wire without protobuf's copies of the image bytes.

An InferRequest is almost entirely `images.data`: 150 KB per 224x224 image, 10-40 MB per request. Through
protobuf the client copies those bytes three times (tensor -> bytes, bytes -> message, message -> wire) and
the server three more (wire -> message, message -> bytes on each `.data` read, bytes -> tensor). Here each
side handles the payload once: `serialize_infer_request` writes the wire form in one join, the image bytes
straight from the tensor's memory, and `parse_infer_request` reads it into a protobuf message of everything
else plus a zero-copy view of the image bytes inside the received buffer.

The bytes are ordinary protobuf wire format (fields may come in any order and a message may be split into
parts that concatenate), so a client that sends a plain `InferRequest` and a server that reads one both
interoperate with these functions. The one case handled by protobuf itself is `images` appearing more than
once, which protobuf merges.

Reading is bounded before it starts: Python walks the request's top-level fields (and the images tensor's)
only to find the image bytes, and stops at MAX_MESSAGE_FIELDS of them; everything else is parsed by protobuf's
own C parser. A request padded with millions of tiny fields (unknown ones, or empty teacher names) is refused
after reading that many, in about a millisecond, instead of costing seconds of the event loop per megabyte.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError

from services._generated import teacher_pb2
from services.core.contract import MAX_OUTPUTS_PER_REQUEST, MAX_TEACHERS_PER_REQUEST

_LENGTH_DELIMITED = 2
_IMAGES_FIELD = teacher_pb2.InferRequest.DESCRIPTOR.fields_by_name["images"].number
_DATA_FIELD = teacher_pb2.Tensor.DESCRIPTOR.fields_by_name["data"].number
_IMAGES_TAG = bytes([_IMAGES_FIELD << 3 | _LENGTH_DELIMITED])
_DATA_TAG = bytes([_DATA_FIELD << 3 | _LENGTH_DELIMITED])
_FIXED_WIDTHS = {1: 8, 5: 4}  # wire types 1 (64-bit) and 5 (32-bit)
_MAX_VARINT_BYTES = 10

MAX_MESSAGE_FIELDS = 4 * (2 * MAX_TEACHERS_PER_REQUEST + MAX_OUTPUTS_PER_REQUEST)
"""The most fields the request, or its images tensor, may carry on the wire (counting each entry of a repeated
field). A valid request has at most 64 teachers, 64 outputs, 64 expected identities and a few single fields;
the factor leaves room for a message sent in concatenated parts (protobuf merges them)."""

MAX_TENSOR_HEADER_BYTES = 1024
"""The most bytes the images tensor may take besides its data: its dtype and shape (a few dimensions) take
tens. Protobuf holds each packed shape entry in 8 bytes, so a longer shape would cost 8 times its size."""


class MessageTooComplexError(DecodeError):
    """A request beyond MAX_MESSAGE_FIELDS or MAX_TENSOR_HEADER_BYTES: refused before it is read in full."""


@dataclass(frozen=True)
class OutgoingInferRequest:
    """What the client sends: the request without its images (`message.images` unset), and the images, a
    contiguous uint8 CPU tensor [B, C, H, W]."""

    message: teacher_pb2.InferRequest
    images: torch.Tensor

    def __post_init__(self) -> None:
        images = self.images
        if images.dtype != torch.uint8 or images.device.type != "cpu" or not images.is_contiguous():
            raise ValueError(
                f"images must be a contiguous uint8 CPU tensor; got {images.dtype} on {images.device}, "
                f"contiguous={images.is_contiguous()}"
            )
        if self.message.HasField("images"):
            raise ValueError("the message must leave `images` unset: the images tensor provides it")

    def byte_size(self) -> int:
        """The length of `serialize_infer_request(self)`."""
        return sum(len(piece) for piece in self._pieces())

    def _pieces(self) -> tuple[bytes | memoryview, ...]:
        tensor_head = teacher_pb2.Tensor(dtype=teacher_pb2.UINT8, shape=self.images.shape).SerializeToString()
        payload = self.images.numpy().reshape(-1).data  # a memoryview of the tensor's bytes, no copy
        payload_length = _varint(len(payload))
        tensor_length = len(tensor_head) + len(_DATA_TAG) + len(payload_length) + len(payload)
        return (
            self.message.SerializeToString(),
            _IMAGES_TAG,
            _varint(tensor_length),
            tensor_head,
            _DATA_TAG,
            payload_length,
            payload,
        )


@dataclass(frozen=True)
class ReceivedInferRequest:
    """What the server reads: the request with `images.data` left empty, the image bytes, a read-only view
    into the received buffer, and the length of that buffer (what holding the request costs the server)."""

    message: teacher_pb2.InferRequest
    image_data: memoryview
    wire_bytes: int


def serialize_infer_request(request: OutgoingInferRequest) -> bytes:
    """The wire form of `request.message` with `images` = (UINT8, the tensor's shape, its bytes): one copy of
    the image bytes, into the returned buffer."""
    return b"".join(request._pieces())


def parse_infer_request(data: bytes) -> ReceivedInferRequest:
    """Read an InferRequest's wire form; DecodeError when it is not one (MessageTooComplexError when it
    carries more fields than a valid one can)."""
    view = memoryview(data)
    rest, images = _split_field(view, _IMAGES_FIELD, teacher_pb2.InferRequest.DESCRIPTOR)
    if len(images) > 1:  # protobuf merges repeated message fields; let it
        message = teacher_pb2.InferRequest.FromString(data)
        image_data = memoryview(message.images.data)
        message.images.ClearField("data")
        return ReceivedInferRequest(message, image_data, len(data))
    message = teacher_pb2.InferRequest.FromString(b"".join(rest))
    image_data = memoryview(b"")
    if images:
        tensor_rest, payloads = _split_field(images[0], _DATA_FIELD, teacher_pb2.Tensor.DESCRIPTOR)
        header_bytes = sum(len(field) for field in tensor_rest)
        if header_bytes > MAX_TENSOR_HEADER_BYTES:
            raise MessageTooComplexError(
                f"images tensor of {header_bytes} bytes besides its data; at most {MAX_TENSOR_HEADER_BYTES}"
            )
        # A scalar field repeated on the wire: the last one wins, as in protobuf.
        image_data = payloads[-1] if payloads else image_data
        message.images.CopyFrom(teacher_pb2.Tensor.FromString(b"".join(tensor_rest)))
    return ReceivedInferRequest(message, image_data, len(data))


def _split_field(
    view: memoryview, number: int, descriptor: Descriptor
) -> tuple[list[memoryview], list[memoryview]]:
    """The wire form `view` of a `descriptor` message cut into (every field but `number`, whole; the values of
    the length-delimited field `number`); MessageTooComplexError beyond MAX_MESSAGE_FIELDS fields."""
    others: list[memoryview] = []
    values: list[memoryview] = []
    position = 0
    while position < len(view):
        if len(others) + len(values) == MAX_MESSAGE_FIELDS:
            raise MessageTooComplexError(_too_many_fields(view, others, values, number, descriptor))
        tag, value_start = _read_varint(view, position)
        wire_type = tag & 7
        if wire_type == 0:
            _, end = _read_varint(view, value_start)
        elif wire_type == _LENGTH_DELIMITED:
            length, content_start = _read_varint(view, value_start)
            end = content_start + length
            if tag >> 3 == number:
                if end > len(view):
                    raise DecodeError("truncated length-delimited field")
                values.append(view[content_start:end])
                position = end
                continue
        elif wire_type in _FIXED_WIDTHS:
            end = value_start + _FIXED_WIDTHS[wire_type]
        else:
            raise DecodeError(f"unsupported wire type {wire_type}")
        if end > len(view):
            raise DecodeError("truncated field")
        others.append(view[position:end])
        position = end
    return others, values


def _too_many_fields(
    view: memoryview, others: list[memoryview], values: list[memoryview], number: int, descriptor: Descriptor
) -> str:
    """What a message cut off at MAX_MESSAGE_FIELDS fields carried: its size and its most frequent field."""
    numbers = Counter(_read_varint(field, 0)[0] >> 3 for field in others)
    numbers[number] += len(values)
    most, count = numbers.most_common(1)[0]
    field = descriptor.fields_by_number.get(most)
    name = repr(field.name) if field is not None else f"unknown field {most}"
    return (
        f"{descriptor.name} of {len(view)} bytes carries more than {MAX_MESSAGE_FIELDS} fields, {count} of "
        f"the first {MAX_MESSAGE_FIELDS} {name}"
    )


def _read_varint(view: memoryview, position: int) -> tuple[int, int]:
    """(value, position after it) of the varint at `position`."""
    value = 0
    for index in range(_MAX_VARINT_BYTES):
        if position + index >= len(view):
            raise DecodeError("truncated varint")
        byte = view[position + index]
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            return value, position + index + 1
    raise DecodeError("varint longer than 10 bytes")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
