import struct
import zlib

import pytest
import torch
import xxhash

from services.formats.codec import (
    DTYPES,
    DTYPES_BY_PROTO_NAME,
    PROTO_DTYPE_NAMES,
    CodecError,
    CorruptValueError,
    decode_value,
    encode_value,
    tensor_from_bytes,
    tensor_to_bytes,
)

SHAPES = [(), (0,), (3, 0, 2), (5,), (2, 3), (2, 1, 4, 3)]


def sample_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    low, high = (0, 256) if dtype == torch.uint8 else (-(2**62), 2**62)
    return torch.randint(low, high, shape, generator=generator, dtype=dtype)


SAME_SIZE_INTEGER = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    bits = SAME_SIZE_INTEGER.get(expected.dtype, expected.dtype)
    assert torch.equal(actual.view(bits), expected.view(bits))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", list(DTYPES))
def test_raw_round_trip_every_dtype_and_shape(name, shape):
    tensor = sample_tensor(DTYPES[name], shape)
    dtype_name, wire_shape, data = tensor_to_bytes(tensor)
    assert (dtype_name, wire_shape) == (name, shape)
    assert_bitwise_equal(tensor_from_bytes(data, dtype_name, wire_shape), tensor)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", list(DTYPES))
def test_framed_round_trip_every_dtype_and_shape(name, shape):
    tensor = sample_tensor(DTYPES[name], shape)
    assert_bitwise_equal(decode_value(encode_value(tensor)), tensor)


def test_bfloat16_bits_survive_exactly_including_nan_inf_and_negative_zero():
    bits = torch.tensor([0x7FC1, 0x7F80, 0xFF80, 0x8000, 0x0001, 0x3F80, 0xC2F7], dtype=torch.int32)
    tensor = bits.to(torch.int16).view(torch.bfloat16)
    raw = tensor_from_bytes(tensor_to_bytes(tensor)[2], "bfloat16", tensor.shape)
    framed = decode_value(encode_value(tensor))
    for decoded in (raw, framed):
        assert torch.equal(decoded.view(torch.int16), tensor.view(torch.int16))


def test_raw_payload_is_little_endian_c_order():
    tensor = torch.tensor([[1, 2], [3, 256]], dtype=torch.int64).t()  # non-contiguous view
    _, shape, data = tensor_to_bytes(tensor)
    assert shape == (2, 2)
    assert data == struct.pack("<4q", 1, 3, 2, 256)


def test_decoded_tensor_is_writable_and_owns_its_memory():
    data = bytearray(tensor_to_bytes(torch.arange(4, dtype=torch.float32))[2])
    decoded = tensor_from_bytes(data, "float32", (4,))
    data[:] = bytes(len(data))
    decoded += 1
    assert decoded.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_tensor_requiring_grad_encodes():
    tensor = torch.ones(3, requires_grad=True) * 2
    assert decode_value(encode_value(tensor)).tolist() == [2.0, 2.0, 2.0]


def test_raw_length_mismatch_names_expected_and_got():
    with pytest.raises(CodecError, match=r"needs 24 bytes, got 20"):
        tensor_from_bytes(bytes(20), "float32", (2, 3))
    with pytest.raises(CodecError, match=r"needs 0 bytes, got 1"):
        tensor_from_bytes(b"\x00", "uint8", (0, 5))


def test_raw_rejects_unknown_dtype_and_negative_shape():
    with pytest.raises(CodecError, match=r"unknown dtype name 'float64'.*float32"):
        tensor_from_bytes(bytes(8), "float64", (1,))
    with pytest.raises(CodecError, match=r"negative dimension"):
        tensor_from_bytes(b"", "uint8", (-1,))


def test_unsupported_tensor_dtype_is_refused():
    with pytest.raises(CodecError, match=r"unsupported dtype torch.float64; supported: float32"):
        encode_value(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(CodecError, match=r"unsupported dtype torch.int32"):
        tensor_to_bytes(torch.zeros(2, dtype=torch.int32))


def test_codec_errors_are_value_errors():
    assert issubclass(CorruptValueError, CodecError)
    assert issubclass(CodecError, ValueError)


def test_proto_name_tables_are_inverse_and_cover_every_dtype():
    assert PROTO_DTYPE_NAMES == {
        "float32": "FLOAT32",
        "float16": "FLOAT16",
        "bfloat16": "BFLOAT16",
        "uint8": "UINT8",
        "int64": "INT64",
    }
    assert {DTYPES_BY_PROTO_NAME[proto]: proto for proto in PROTO_DTYPE_NAMES.values()} == PROTO_DTYPE_NAMES


def test_framed_header_layout():
    value = encode_value(torch.tensor([[1, 2, 3]], dtype=torch.uint8))
    assert value[:4] == b"EKDT"
    assert value[4:7] == bytes([1, 1, 2])  # version 1, dtype code 1 (the proto's UINT8), two dims
    assert struct.unpack_from("<2IQ", value, 7) == (1, 3, 3)
    assert value[-3:] == b"\x01\x02\x03"


FRAMED = encode_value(torch.arange(6, dtype=torch.float16).reshape(2, 3))
HEADER_LENGTH = 7 + 2 * 4 + 16


def replaced(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new) :]


@pytest.mark.parametrize(
    ("damaged", "message"),
    [
        (replaced(FRAMED, HEADER_LENGTH + 3, bytes([FRAMED[HEADER_LENGTH + 3] ^ 0x01])), "checksum mismatch"),
        (replaced(FRAMED, HEADER_LENGTH - 1, bytes([FRAMED[HEADER_LENGTH - 1] ^ 0x80])), "checksum mismatch"),
        (FRAMED[:-1], r"truncated: 42 bytes, expected 43"),
        (FRAMED[: HEADER_LENGTH - 1], "shorter than its 31-byte header"),
        (FRAMED[:5], "shorter than the 7-byte prefix"),
        (b"", "shorter than the 7-byte prefix"),
        (FRAMED + b"\x00", r"extra bytes: 44 bytes, expected 43"),
        (replaced(FRAMED, 0, b"EKDX"), r"bad magic b'EKDX'"),
        (replaced(FRAMED, 4, b"\x03"), "unknown format version 3"),
        (replaced(FRAMED, 5, b"\x09"), "unknown dtype code 9"),
        (replaced(FRAMED, 7, struct.pack("<I", 3)), "header says 12 payload bytes but a float16 tensor"),
        (b"\x80\x04\x95garbage that a pickle would start with", "bad magic"),
    ],
    ids=[
        "payload-bit-flip",
        "checksum-bit-flip",
        "truncated-payload",
        "truncated-header",
        "truncated-prefix",
        "empty",
        "extra-byte",
        "bad-magic",
        "bad-version",
        "bad-dtype",
        "shape-disagrees",
        "foreign-bytes",
    ],
)
def test_every_corruption_is_detected(damaged, message):
    with pytest.raises(CorruptValueError, match=message):
        decode_value(damaged)


def planed_frame(dtype_code: int, elements: int, payload: bytes) -> bytes:
    """A version-2 frame around `payload` for a 1-D tensor, its checksum right: only the planes are wrong."""
    return (
        struct.pack("<4sBBBI", b"EKDT", 2, dtype_code, 1, elements)
        + struct.pack("<QQ", len(payload), xxhash.xxh3_64_intdigest(payload))
        + payload
    )


def deflated(data: bytes) -> bytes:
    return zlib.compress(data, 9, -15)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_logits_are_stored_in_byte_planes_bit_exactly_and_smaller(dtype):
    # Logits of 1000 classes, and the values whose bits must survive: NaN, infinities, -0, a subnormal.
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    logits[:5] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 1e-7])
    tensor = logits.to(dtype)
    value = encode_value(tensor)
    assert value[4] == 2 and len(value) < 27 + 2 * 1000 - 200
    assert_bitwise_equal(decode_value(value), tensor)


def test_elements_whose_high_bytes_do_not_shrink_are_stored_as_they_are():
    noise = torch.randint(-(2**15), 2**15, (1000,), generator=torch.Generator().manual_seed(0))
    tensor = noise.to(torch.int16).view(torch.float16)
    value = encode_value(tensor)
    assert value[4] == 1 and len(value) == 27 + 2 * 1000
    assert_bitwise_equal(decode_value(value), tensor)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (planed_frame(3, 100, b"\xff" * 20 + bytes(100)), "does not inflate"),
        (planed_frame(3, 100, deflated(bytes(60)) + bytes(100)), "inflate to exactly 100 bytes"),
        # 65 bytes that would inflate to 50 kB: inflating stops one byte past the plane.
        (planed_frame(3, 100, deflated(bytes(50_000)) + bytes(100)), "inflate to exactly 100 bytes"),
        (planed_frame(3, 100, deflated(bytes(100)) + b"\x00" + bytes(100)), "inflate to exactly 100 bytes"),
        (planed_frame(3, 100, bytes(50)), "has 200 .in planes: more than half that, less than all"),
        (planed_frame(2, 100, deflated(bytes(100)) + bytes(100)), "holds 16-bit elements, not float32"),
    ],
    ids=[
        "not-deflate",
        "inflates-short",
        "inflates-far-too-far",
        "bytes-after-the-stream",
        "too-short",
        "float32",
    ],
)
def test_damaged_planes_are_detected_even_under_a_right_checksum(frame, message):
    with pytest.raises(CorruptValueError, match=message):
        decode_value(frame)
