"""Tensors <-> bytes without pickle: the raw form for the gRPC `Tensor` message and the framed form for cache
values.

Raw: the payload is the tensor's elements in C order, little-endian; dtype and shape travel beside it (the
proto's `DType` enum and `shape` field). bfloat16 travels as its 16-bit pattern, since numpy has no bfloat16.

Framed (cache values): one self-describing, checksummed blob, so a truncated or bit-flipped value read back
from LMDB or Redis is detected instead of being returned as data:

    magic b"EKDT" | version u8 | dtype code u8 | ndim u8 | shape u32 * ndim | payload length u64 |
    xxh3_64(payload) u64 | payload

All header integers are little-endian. Version 1 stores the raw payload. Version 2, for 16-bit elements,
stores them as two byte planes: the high bytes (sign, exponent and the top of the mantissa: a few values
repeat) deflated, then the low bytes as they are. A 1000-class fp16 logit vector shrinks from 2,000 to about
1,760 bytes, which keeps an LMDB entry on its leaf page (two to a 4 KiB page) instead of an overflow page of
its own; the planes cost a fast deflate on write and are bit-exact. A value whose high plane does not shrink
is stored as version 1. The checksum covers the stored payload, so damage is found before anything is
inflated, and inflating stops at the element count the header declares.
"""

from __future__ import annotations

import math
import struct
import warnings
import zlib
from collections.abc import Sequence

import numpy as np
import torch
import xxhash

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "uint8": torch.uint8,
    "int64": torch.int64,
}
"""The dtypes that cross the wire or enter the cache, by their Python name."""

DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

PROTO_DTYPE_NAMES: dict[str, str] = {name: name.upper() for name in DTYPES}
"""Python dtype name -> the proto `DType` enum value name (e.g. "bfloat16" -> "BFLOAT16")."""

DTYPES_BY_PROTO_NAME: dict[str, str] = {proto: name for name, proto in PROTO_DTYPE_NAMES.items()}
"""Proto `DType` enum value name -> Python dtype name; the inverse of `PROTO_DTYPE_NAMES`."""

# How each dtype's elements are laid out on the wire. bfloat16 is carried as its int16 bit pattern.
_WIRE_NUMPY_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<i2"),
    "uint8": np.dtype("u1"),
    "int64": np.dtype("<i8"),
}

# Framed-format dtype codes (and the cache keys' form codes), the same numbers as the proto's DType enum. They
# are part of the stored format: never renumber, only append.
DTYPE_CODES: dict[str, int] = {"uint8": 1, "float32": 2, "float16": 3, "bfloat16": 4, "int64": 5}
_DTYPES_BY_CODE: dict[int, str] = {code: name for name, code in DTYPE_CODES.items()}

MAGIC = b"EKDT"
FORMAT_VERSION = 1
PLANED_FORMAT_VERSION = 2  # 16-bit elements as byte planes, the high plane deflated (the module docstring)
# Raw deflate (no zlib header or trailer: the frame has its own checksum) at its fastest level, which on
# logits and feature maps gives within a few percent of the best level's size at several times its speed.
_DEFLATE_WBITS = -15
_DEFLATE_LEVEL = 1
_PREFIX = struct.Struct("<4sBBB")  # magic, version, dtype code, ndim
_LENGTH_AND_CHECKSUM = struct.Struct("<QQ")  # payload length, xxh3_64 of the payload
_MAX_DIM = 2**32 - 1
_MAX_NDIM = 255


class CodecError(ValueError):
    """A tensor cannot be encoded, or bytes do not describe the tensor they claim to."""


class CorruptValueError(CodecError):
    """A framed value is damaged or foreign: bad magic, unknown version or dtype, wrong length or checksum."""


def _name_of(dtype: torch.dtype) -> str:
    """The Python name of a supported torch dtype; CodecError for any other."""
    if dtype not in DTYPE_NAMES:
        raise CodecError(f"unsupported dtype {dtype}; supported: {', '.join(DTYPES)}")
    return DTYPE_NAMES[dtype]


def _check_dtype_name(name: str) -> None:
    if name not in DTYPES:
        raise CodecError(f"unknown dtype name {name!r}; supported: {', '.join(DTYPES)}")


def _payload_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's elements, C order, little-endian."""
    name = _name_of(tensor.dtype)
    tensor = tensor.detach().cpu().contiguous()
    if name == "bfloat16":
        tensor = tensor.view(torch.int16)
    return tensor.numpy().astype(_WIRE_NUMPY_DTYPES[name], copy=False).tobytes()


def _tensor_from_payload(
    payload: bytes | memoryview, name: str, shape: tuple[int, ...], *, copy: bool = True
) -> torch.Tensor:
    wire = _WIRE_NUMPY_DTYPES[name]
    array = np.frombuffer(payload, dtype=wire)
    if copy or array.dtype.newbyteorder("=") != array.dtype:
        # One copy: into a writable, native-endian array that the tensor then shares.
        array = array.astype(wire.newbyteorder("="), copy=True)
        tensor = torch.from_numpy(array)
    else:
        tensor = shared_tensor(array)
    if name == "bfloat16":
        tensor = tensor.view(torch.bfloat16)
    return tensor.reshape(shape)


def shared_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing `array`'s memory, which may be read-only (received bytes, Ray's object store): the
    caller must not write to it, since torch has no read-only tensors."""
    with warnings.catch_warnings():
        # torch warns (once) about exactly that; the caller has promised not to write.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _expected_payload_length(name: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * _WIRE_NUMPY_DTYPES[name].itemsize


def tensor_to_bytes(tensor: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    """Raw encoding for the gRPC `Tensor` message: (dtype name, shape, little-endian C-order payload)."""
    return _name_of(tensor.dtype), tuple(tensor.shape), _payload_bytes(tensor)


def tensor_from_bytes(
    data: bytes | memoryview, dtype_name: str, shape: Sequence[int], *, copy: bool = True
) -> torch.Tensor:
    """Inverse of `tensor_to_bytes`. CodecError when the dtype is unknown, a dimension is negative, or the
    byte length does not match dtype x shape.

    `copy=False` shares `data` instead of copying it where the bytes are already in native order: the tensor
    then keeps `data` alive, and nothing may write to it (torch has no read-only tensors)."""
    shape = _checked_payload(data, dtype_name, shape)
    return _tensor_from_payload(data, dtype_name, shape, copy=copy)


def _checked_payload(data: bytes | memoryview, dtype_name: str, shape: Sequence[int]) -> tuple[int, ...]:
    """The shape as ints, once the dtype is known, no dimension is negative and `data` holds exactly dtype x
    shape bytes (else CodecError)."""
    _check_dtype_name(dtype_name)
    shape = tuple(int(dim) for dim in shape)
    if any(dim < 0 for dim in shape):
        raise CodecError(f"shape {shape} has a negative dimension")
    expected = _expected_payload_length(dtype_name, shape)
    if len(data) != expected:
        raise CodecError(f"{dtype_name} tensor of shape {shape} needs {expected} bytes, got {len(data)}")
    return shape


def decode_into(out: torch.Tensor, data: bytes | memoryview, dtype_name: str, shape: Sequence[int]) -> None:
    """`tensor_from_bytes` written straight into `out` (a CPU tensor of that shape and of a dtype numpy has,
    e.g. rows of a larger float32 result), converting the dtype on the way: one pass over the bytes instead
    of a copy, a cast and another copy. Checks and errors as `tensor_from_bytes`."""
    shape = _checked_payload(data, dtype_name, shape)
    if tuple(out.shape) != shape:
        raise CodecError(f"cannot decode a tensor of shape {shape} into one of shape {tuple(out.shape)}")
    wire = np.frombuffer(data, dtype=_WIRE_NUMPY_DTYPES[dtype_name]).reshape(shape)
    if dtype_name == "bfloat16":  # numpy has no bfloat16: its bits are the upper half of a float32's
        out.copy_(torch.from_numpy((wire.astype("<i4") << 16).view("<f4")))
    else:
        np.copyto(out.numpy(), wire, casting="unsafe")


def encode_value(tensor: torch.Tensor) -> bytes:
    """Framed encoding for cache values: versioned header with dtype, shape, length and checksum."""
    name = _name_of(tensor.dtype)
    shape = tuple(tensor.shape)
    if len(shape) > _MAX_NDIM:
        raise CodecError(f"tensor has {len(shape)} dimensions; the framed format holds at most {_MAX_NDIM}")
    if any(dim > _MAX_DIM for dim in shape):
        raise CodecError(f"shape {shape} has a dimension above {_MAX_DIM}, the framed format's limit")
    payload = _payload_bytes(tensor)
    version = FORMAT_VERSION
    if _WIRE_NUMPY_DTYPES[name].itemsize == 2 and payload:
        planes = np.frombuffer(payload, dtype=np.uint8).reshape(-1, 2)
        high = zlib.compress(planes[:, 1].tobytes(), _DEFLATE_LEVEL, _DEFLATE_WBITS)
        if len(high) < len(planes):
            version, payload = PLANED_FORMAT_VERSION, high + planes[:, 0].tobytes()
    header = (
        _PREFIX.pack(MAGIC, version, DTYPE_CODES[name], len(shape))
        + struct.pack(f"<{len(shape)}I", *shape)
        + _LENGTH_AND_CHECKSUM.pack(len(payload), xxhash.xxh3_64_intdigest(payload))
    )
    return header + payload


def decode_value(data: bytes | memoryview) -> torch.Tensor:
    """Inverse of `encode_value`. CorruptValueError for anything but exactly one intact framed value."""
    view = memoryview(data)
    if len(view) < _PREFIX.size:
        raise CorruptValueError(
            f"value truncated: {len(view)} bytes is shorter than the {_PREFIX.size}-byte prefix"
        )
    magic, version, code, ndim = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise CorruptValueError(f"bad magic {magic!r}; expected {MAGIC!r}")
    if version not in (FORMAT_VERSION, PLANED_FORMAT_VERSION):
        raise CorruptValueError(
            f"unknown format version {version}; this codec reads versions {FORMAT_VERSION} and "
            f"{PLANED_FORMAT_VERSION}"
        )
    if code not in _DTYPES_BY_CODE:
        raise CorruptValueError(f"unknown dtype code {code}; known: {sorted(_DTYPES_BY_CODE)}")
    name = _DTYPES_BY_CODE[code]
    header_length = _PREFIX.size + 4 * ndim + _LENGTH_AND_CHECKSUM.size
    if len(view) < header_length:
        raise CorruptValueError(
            f"value truncated: {len(view)} bytes is shorter than its {header_length}-byte header"
        )
    shape = struct.unpack_from(f"<{ndim}I", view, _PREFIX.size)
    payload_length, checksum = _LENGTH_AND_CHECKSUM.unpack_from(view, _PREFIX.size + 4 * ndim)
    expected = _expected_payload_length(name, shape)
    planed = version == PLANED_FORMAT_VERSION
    if planed and _WIRE_NUMPY_DTYPES[name].itemsize != 2:
        raise CorruptValueError(f"format version {version} holds 16-bit elements, not {name}")
    # A planed payload is the deflated high plane (shorter than the plane) and the low plane.
    fits = expected // 2 < payload_length < expected if planed else payload_length == expected
    if not fits:
        raise CorruptValueError(
            f"header says {payload_length} payload bytes but a {name} tensor of shape {shape} has {expected}"
            + (" (in planes: more than half that, less than all)" if planed else "")
        )
    if len(view) != header_length + payload_length:
        problem = "truncated" if len(view) < header_length + payload_length else "has extra bytes"
        raise CorruptValueError(
            f"value {problem}: {len(view)} bytes, expected {header_length + payload_length}"
        )
    payload = view[header_length:]
    if xxhash.xxh3_64_intdigest(payload) != checksum:
        raise CorruptValueError("payload checksum mismatch")
    if planed:
        return _tensor_from_payload(_joined_planes(payload, expected // 2).data, name, shape, copy=False)
    return _tensor_from_payload(payload, name, shape)


def _joined_planes(payload: memoryview, elements: int) -> np.ndarray:
    """The little-endian 16-bit elements of a planed payload: the deflated high plane, then the low plane."""
    inflater = zlib.decompressobj(_DEFLATE_WBITS)
    try:
        # At most one byte past the plane: enough to tell a stream that inflates too far.
        high = inflater.decompress(payload[:-elements], elements + 1)
    except zlib.error as error:
        raise CorruptValueError(f"high byte plane does not inflate: {error}") from None
    if len(high) != elements or not inflater.eof or inflater.unused_data:
        raise CorruptValueError(f"high byte plane does not inflate to exactly {elements} bytes")
    joined = np.empty((elements, 2), dtype=np.uint8)
    joined[:, 0] = np.frombuffer(payload[-elements:], dtype=np.uint8)
    joined[:, 1] = np.frombuffer(high, dtype=np.uint8)
    return joined.reshape(-1)
