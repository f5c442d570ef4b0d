"""The quantized soft-label form: one teacher's logits for one view in 910 bytes (1000 classes), framing
included, with the KD loss and its gradient within 1 % of full fp32 logits at T = 1, 2 and 4 on long-tailed
1000-class logits (`benchmarks/soft_labels.py`): between the compact form (63 bytes, exact only on its top 16
and the tail's total, 23-53 % off at T = 2-4) and fp16 logits (2,027 bytes).

What it keeps: every class's gap below the largest logit, g_j = t_max − t_j, in class order, so no class index
is stored (sending an order of 1000 classes alone costs about 1 KB). Each gap is a 12-bit code of g_j over the
row's range R (its largest gap, as float16): f_j = round(4095 · g_j / R). Every class keeps the top 7 bits of
its code; the 32 classes whose 7-bit codes are smallest (the most probable ones; ties by class index, so the
decoder finds the same 32 from the 7-bit codes alone) keep all 12. A gap is read back as the middle of what
its code leaves open, but the last 7-bit code as R itself, so that quantizing decoded logits gives them back.
The largest logit is kept as float32, so the logits come back, not only their softmax: any temperature applies
to one stored value.

Why this shape (measured on the benchmark's logits, worst of loss and gradient error at T = 1, 2, 4):
uniform 7-bit codes alone miss 1 % at T = 1 by their gradient (3.3 %: the few classes that hold the mass
need finer steps), 8-bit codes alone take 1,000 bytes for 0.64 % (companded) to 1.7 % (uniform); refining
the 32 most probable classes to 12 bits takes 20 bytes more than 7 bits and gives 0.72 %. A fixed range (a
clip at 16-32 below the top) is worse at every size: long-tailed rows reach 90 below the top, and clipping
those raises the tail's mass at T ≥ 4.

The frame (little-endian, one per view, checksummed so that a damaged or truncated value is detected, never
returned as data):

    magic 0xC6 u8 | version u8 | num_classes u16 | refined count u8 | largest logit f32 | range R f16 |
    num_classes × 7-bit codes | refined × 5 low bits, bit-packed, zero-padded to a byte | xxh32 u32

    15 bytes of fixed fields + ceil((7 · C + 5 · min(32, C)) / 8): 910 bytes for 1000 classes, 30 for 10.

Decoded, a frame is a float32 tensor [C] of logits: what the KD loss takes like any dense teacher logits.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch
import xxhash

from services.formats.codec import CorruptValueError

MAGIC = 0xC6
FORMAT_VERSION = 1
MAX_CLASSES = 2**16 - 1
CODE_BITS = 12
COARSE_BITS = 7
REFINED_CLASSES = 32

_FINE_CODES = 2**CODE_BITS - 1
_LOW_BITS = CODE_BITS - COARSE_BITS
_LAST_COARSE = 2**COARSE_BITS - 1
_HEADER = struct.Struct("<BBHBfe")  # magic, version, num_classes, refined count, largest logit, range R
_CHECKSUM = struct.Struct("<I")
FIXED_BYTES = _HEADER.size + _CHECKSUM.size
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def refined_classes(num_classes: int) -> int:
    """How many classes keep their full 12-bit code."""
    return min(REFINED_CLASSES, num_classes)


def frame_bytes(num_classes: int) -> int:
    """The size of the frame of one row of `num_classes` logits."""
    return FIXED_BYTES + math.ceil((COARSE_BITS * num_classes + _LOW_BITS * refined_classes(num_classes)) / 8)


def _refined_order(coarse: np.ndarray, refined: int) -> np.ndarray:
    """[B, refined] class indices: the smallest coarse codes of each row, ties by class index."""
    return np.argsort(coarse, axis=1, kind="stable")[:, :refined]


def _gaps(coarse: np.ndarray, order: np.ndarray, low: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """Gaps below the top [B, C] from the codes: a refined class's full code, the others their bin's
    centre."""
    # Each 7-bit code's middle, but the last one's end: the row's largest gap comes back as its range exactly,
    # so that quantizing decoded logits gives them back (a cached or served value passes through unchanged).
    fine = np.where(coarse == _LAST_COARSE, _FINE_CODES, coarse * 2**_LOW_BITS + 2 ** (_LOW_BITS - 1))
    fine = fine.astype(np.float64)
    exact = coarse[np.arange(coarse.shape[0])[:, None], order].astype(np.int64) << _LOW_BITS | low
    np.put_along_axis(fine, order, exact.astype(np.float64), axis=1)
    return fine * (ranges[:, None] / _FINE_CODES)


def _encoding(logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(largest logit f32 [B], range f16 [B], coarse codes [B, C], refined classes [B, r], their low bits)."""
    if logits.dim() != 2:
        raise ValueError(f"quantize needs logits [batch, classes]; got shape {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"the quantized form holds 2 to {MAX_CLASSES} classes; got {num_classes}")
    exact = logits.detach().cpu().double().numpy()
    if not np.isfinite(exact).all():
        raise ValueError("the quantized form holds finite logits only")
    top = exact.max(axis=1).astype(np.float32)
    gaps = np.clip(top.astype(np.float64)[:, None] - exact, 0.0, _FLOAT16_MAX)
    ranges = gaps.max(axis=1).astype(np.float16)  # a gap above a range rounded down takes the last code
    scale = np.divide(_FINE_CODES, ranges.astype(np.float64), out=np.zeros(len(ranges)), where=ranges > 0)
    fine = np.clip(np.rint(gaps * scale[:, None]), 0, _FINE_CODES).astype(np.int64)
    coarse = fine >> _LOW_BITS
    order = _refined_order(coarse, refined_classes(num_classes))
    low = np.take_along_axis(fine, order, axis=1) & (2**_LOW_BITS - 1)
    return top, ranges, coarse, order, low


def quantized(logits: torch.Tensor) -> torch.Tensor:
    """float32 [B, C]: logits [B, C] exactly as their frames decode, for a run that takes this form without a
    cache or a service in between (so that it trains on the same values)."""
    top, ranges, coarse, order, low = _encoding(logits)
    gaps = _gaps(coarse, order, low, ranges.astype(np.float64))
    return torch.from_numpy((top.astype(np.float64)[:, None] - gaps).astype(np.float32))


def _bits(values: np.ndarray, width: int) -> np.ndarray:
    """[B, n] non-negative ints -> [B, n · width] of 0/1, most significant bit first."""
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    return ((values[..., None] >> shifts) & 1).reshape(values.shape[0], -1).astype(np.uint8)


def _ints(bits: np.ndarray, width: int) -> np.ndarray:
    weights = 1 << np.arange(width - 1, -1, -1, dtype=np.int64)
    return (bits.reshape(-1, width).astype(np.int64) * weights).sum(axis=1)


def encode(logits: torch.Tensor) -> list[bytes]:
    """One frame per row of logits [B, C] (see the module doc)."""
    top, ranges, coarse, _, low = _encoding(logits)
    num_classes = coarse.shape[1]
    packed = np.packbits(np.concatenate([_bits(coarse, COARSE_BITS), _bits(low, _LOW_BITS)], axis=1), axis=1)
    frames = []
    for row in range(len(top)):
        body = (
            _HEADER.pack(
                MAGIC, FORMAT_VERSION, num_classes, refined_classes(num_classes), top[row], ranges[row]
            )
            + packed[row].tobytes()
        )
        frames.append(body + _CHECKSUM.pack(xxhash.xxh32_intdigest(body)))
    return frames


def is_quantized_frame(data: bytes | memoryview) -> bool:
    """Whether `data` claims to be a quantized frame (its first byte); `decode` checks the rest."""
    return len(data) > 0 and data[0] == MAGIC


def decode(data: bytes | memoryview) -> torch.Tensor:
    """The float32 [C] logits of a frame. CorruptValueError for anything but one intact frame."""
    view = memoryview(data)
    if len(view) < FIXED_BYTES:
        raise CorruptValueError(f"quantized frame truncated: {len(view)} bytes, shorter than {FIXED_BYTES}")
    magic, version, num_classes, refined, top, value_range = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise CorruptValueError(f"bad quantized-form magic {magic:#04x}; expected {MAGIC:#04x}")
    if version != FORMAT_VERSION:
        raise CorruptValueError(f"unknown quantized format version {version}; this reads {FORMAT_VERSION}")
    if num_classes < 2 or refined != refined_classes(num_classes):
        raise CorruptValueError(f"quantized frame claims {refined} refined classes of {num_classes}")
    expected = frame_bytes(num_classes)
    if len(view) != expected:
        raise CorruptValueError(
            f"quantized frame of {len(view)} bytes; {num_classes} classes need {expected}"
        )
    (checksum,) = _CHECKSUM.unpack_from(view, expected - _CHECKSUM.size)
    if xxhash.xxh32_intdigest(view[: expected - _CHECKSUM.size]) != checksum:
        raise CorruptValueError("quantized frame checksum mismatch")
    if not (math.isfinite(top) and math.isfinite(value_range) and value_range >= 0):
        raise CorruptValueError(f"quantized frame holds a largest logit {top} and range {value_range}")
    bits = np.unpackbits(np.frombuffer(view[_HEADER.size : expected - _CHECKSUM.size], dtype=np.uint8))
    coarse = _ints(bits[: COARSE_BITS * num_classes], COARSE_BITS).reshape(1, -1)
    low = _ints(bits[COARSE_BITS * num_classes :][: _LOW_BITS * refined], _LOW_BITS).reshape(1, -1)
    gaps = _gaps(coarse, _refined_order(coarse, refined), low, np.array([value_range], dtype=np.float64))
    return torch.from_numpy((top - gaps[0]).astype(np.float32))
