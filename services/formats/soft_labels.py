"""The compact soft-label form: one teacher's logits for one view in at most 64 bytes (1000 classes), framing
included: exact on the kept classes and on the tail's total mass at any temperature, not on how the tail's
mass splits among its classes (at T >= 2 on long-tailed 1000-class logits that costs 23-84 % of the KD loss:
see `benchmarks/soft_labels.py`; use the full form where that matters).

Where it is used: the trainer reads it (`teacher_source.soft_labels: compact`), `ekd warm` writes it, the
cache keys it apart from full values, and the gRPC contract carries it (`InferRequest.logits_form`
LOGITS_FORM_COMPACT; `InferResponse.compact_logits`, uint8 [count, frame bytes] as `frames_tensor` lays them
out): the servicer streams and caches `compress` of its float32 logits, the client returns `CompactLogits`.

What it keeps. Logits, not probabilities, so that any experiment's temperature T applies to one stored value:
the k largest logits (class index and gap below the largest logit, k = 16 for 1000 classes, every class for up
to 22 classes), the largest logit itself, and a summary of the other C − k classes (the tail): its log-sum-exp
relative to the largest logit,

    h(β) = log Σ_{j in tail} exp(−β · (t_max − t_j)),   at β = 1/T ∈ {0.1, 0.25, 0.5, 1} (h(0) = log(C − k)),

interpolated between those inverse temperatures by a cubic spline (not-a-knot; the same weights serve every
row). With it, softmax(t / T) is exact on the k kept classes and the tail's total mass is exact at the four
stored temperatures, within 1 % between them (T from 1 to 10 and beyond, `benchmarks/soft_labels.py`); below T
= 1 the spline extrapolates and the tail's mass may be off by 10-40 %.

Why this and not the alternatives (measured in `benchmarks/soft_labels.py`): top-k probabilities (FKD,
ImageNet+) are frozen at one temperature and drop the tail's mass, which at T = 4 holds most of the
probability of a long-tailed 1000-class output; importance-sampled entries (Sparse Logit Sampling, ACL 2025)
are unbiased only in expectation, so each view's loss and gradient carry sampling noise larger than the
top-k's error at the same size. How the tail's mass is spread over its classes is what 64 bytes cannot carry
(that takes per-class information for ~1000 classes). `target_probs` spreads it like the student's own softmax
over the tail: the KD loss is then exactly the KL divergence between teacher and student with the tail merged
into one class (a lower bound of the full KL), its gradient on the kept classes and on the tail's total is
exact, and the tail's classes get no gradient among themselves. That beats spreading the mass uniformly (FKD's
marginal smoothing) in both loss and gradient error at every temperature, and it never pushes the student
toward a flat tail the teacher does not have. At T >= 2 on long-tailed logits the missing within-tail term is
what makes the error (see the README's table).

The frame (little-endian; one per view, self-describing and checksummed so that a damaged or truncated value
is detected, never returned as data):

    magic 0xC5 u8 | version u8 | num_classes u16 | k u8 | largest logit f16 | h(β) u16 × 4 |
    k × (class index: ceil(log2 C) bits, gap code: 12 bits), bit-packed, zero-padded to a byte |
    xxh32 of all of the above u32

    19 bytes of fixed fields + ceil(k · (index bits + 12) / 8): 63 bytes for 1000 classes (k = 16), 39 for 10.

A gap g ∈ [0, 64] is stored as round(4095 · sqrt(g / 64)): finest near the top, where classes carry the most
probability (0.001 logits at g = 0.1, 0.008 at g = 4; larger gaps are clamped to 64); h(β) is stored in steps
of 1/1024 over [−52, 12) (a tail below e^−52 of the top class is stored as that). Decoding and re-encoding are
exact: `compress` returns precisely what decoding its frame gives.

What the rest adds per value: the cache key (`services.cache.output_key`, 51 bytes for a compact logits entry:
namespace, 12-character teacher tag, output, form, 16-byte hash), and each backend its own per-entry overhead,
measured in `benchmarks/soft_labels.py` (LMDB: about 430 bytes an entry, its B-tree pages about a third full
under random keys; Redis: its dict entry, object headers and allocator rounding, about 90 bytes beyond key +
value, 205 in all)."""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from services.formats.codec import CorruptValueError

COMPACT_BYTES = 64
"""The most bytes one compact frame takes for 1000 classes (it takes 63)."""

MAGIC = 0xC5
FORMAT_VERSION = 1
INVERSE_TEMPERATURES = (0.1, 0.25, 0.5, 1.0)
"""β = 1/T at which the tail's log-sum-exp is stored; between them it is interpolated."""

MAX_CLASSES = 2**16 - 1
MAX_ENTRIES = 255

_GAP_BITS = 12
_GAP_CODES = 2**_GAP_BITS - 1
_GAP_RANGE = 64.0
_TAIL_OFFSET = 52.0
_TAIL_STEPS_PER_UNIT = 1024.0
_TAIL_CODES = 2**16 - 1
_HEADER = struct.Struct("<BBHBe4H")  # magic, version, num_classes, k, largest logit, h(β) × 4
_CHECKSUM = struct.Struct("<I")
FIXED_BYTES = _HEADER.size + _CHECKSUM.size


def index_bits(num_classes: int) -> int:
    """Bits of one class index."""
    return max(1, (num_classes - 1).bit_length())


def entries_that_fit(num_classes: int, max_bytes: int = COMPACT_BYTES) -> int:
    """The k of the frame for `num_classes` classes: as many top logits as fit in `max_bytes`, at most C."""
    fitting = (max_bytes - FIXED_BYTES) * 8 // (index_bits(num_classes) + _GAP_BITS)
    return min(num_classes, fitting, MAX_ENTRIES)


def frame_bytes(num_classes: int, entries: int) -> int:
    """The size of a frame holding `entries` top logits of `num_classes` classes."""
    return FIXED_BYTES + math.ceil(entries * (index_bits(num_classes) + _GAP_BITS) / 8)


@dataclass(frozen=True)
class CompactLogits:
    """A batch of compact teacher logits: for row b, its k largest logits (`indices[b]`, in descending order,
    at `top[b] - gaps[b]`) and the tail's relative log-sum-exp `tail[b]` at `INVERSE_TEMPERATURES`."""

    num_classes: int
    top: torch.Tensor  # [B] float32: the largest logit
    indices: torch.Tensor  # [B, k] int64
    gaps: torch.Tensor  # [B, k] float32: top - logit, >= 0, ascending
    tail: torch.Tensor  # [B, len(INVERSE_TEMPERATURES)] float32: h(β); unused when k == num_classes

    def __len__(self) -> int:
        return self.indices.shape[0]

    @property
    def entries(self) -> int:
        return self.indices.shape[1]

    @property
    def has_tail(self) -> bool:
        return self.entries < self.num_classes

    @property
    def values(self) -> torch.Tensor:
        """The kept logits [B, k], largest first."""
        return self.top.unsqueeze(1) - self.gaps

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CompactLogits:
        return CompactLogits(
            self.num_classes,
            *(
                t.to(device, non_blocking=non_blocking)
                for t in (self.top, self.indices, self.gaps, self.tail)
            ),
        )

    def __getitem__(self, rows) -> CompactLogits:
        """The rows `rows` selects (an int keeps a batch of one)."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1 if rows != -1 else None)
        return CompactLogits(
            self.num_classes, self.top[rows], self.indices[rows], self.gaps[rows], self.tail[rows]
        )

    @staticmethod
    def cat(parts: list[CompactLogits]) -> CompactLogits:
        """The rows of `parts` in order; they must share the number of classes and of entries."""
        if not parts:
            raise ValueError("CompactLogits.cat needs at least one part")
        shapes = {(p.num_classes, p.entries) for p in parts}
        if len(shapes) != 1:
            raise ValueError(
                f"cannot concatenate compact logits of different (classes, entries): {sorted(shapes)}"
            )
        return CompactLogits(
            parts[0].num_classes,
            torch.cat([p.top for p in parts]),
            torch.cat([p.indices for p in parts]),
            torch.cat([p.gaps for p in parts]),
            torch.cat([p.tail for p in parts]),
        )

    def tail_log_mass(self, temperature: float) -> torch.Tensor:
        """h(1/T) [B]: the tail's log-sum-exp at temperature T, relative to the largest logit over T."""
        beta = 1.0 / temperature
        at_zero = torch.full_like(self.tail[:, :1], math.log(self.num_classes - self.entries))
        weights = torch.tensor(_spline_weights(beta), dtype=self.tail.dtype, device=self.tail.device)
        return torch.cat([at_zero, self.tail], dim=1) @ weights

    def log_probs(self, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """log softmax(t / T) at the kept classes [B, k], and the log of the tail's total probability [B]
        (−inf without a tail)."""
        scaled = -self.gaps / temperature
        if not self.has_tail:
            return torch.log_softmax(scaled, dim=1), torch.full_like(self.top, -math.inf)
        tail = self.tail_log_mass(temperature)
        log_z = torch.logaddexp(torch.logsumexp(scaled, dim=1), tail)
        return scaled - log_z.unsqueeze(1), tail - log_z

    def target_probs(self, temperature: float, reference_logits: torch.Tensor) -> torch.Tensor:
        """The teacher's softened distribution [B, C] at temperature T: exact on the kept classes, the tail's
        exact total spread over the tail as softmax(reference / T) spreads it there (the student's logits, so
        that the KD loss is the KL with the tail merged into one class; see the module doc). No gradient flows
        into `reference_logits`."""
        log_top, log_tail = self.log_probs(temperature)
        with torch.no_grad():
            reference = reference_logits.detach().float() / temperature
            if self.has_tail:
                in_tail = reference.scatter(1, self.indices, -math.inf)
                target = torch.softmax(in_tail, dim=1) * log_tail.exp().unsqueeze(1)
            else:
                target = torch.zeros_like(reference)
        return target.scatter(1, self.indices, log_top.exp())


@functools.lru_cache(maxsize=64)
def _spline_weights(beta: float) -> tuple[float, ...]:
    """w with h(β) = Σ_i w_i · h(nodes_i): the not-a-knot cubic spline through (0, *INVERSE_TEMPERATURES) is
    linear in the values it passes through, so one weight vector per temperature serves every row."""
    x = np.array((0.0, *INVERSE_TEMPERATURES))
    n = len(x)
    h = np.diff(x)
    # Second derivatives M solve A M = B y: continuity of the first derivative at the interior nodes, and
    # a continuous third derivative at the second and the second-to-last node (not-a-knot).
    a = np.zeros((n, n))
    b = np.zeros((n, n))
    for i in range(1, n - 1):
        a[i, i - 1 : i + 2] = h[i - 1], 2 * (h[i - 1] + h[i]), h[i]
        b[i, i - 1 : i + 2] = 6 / h[i - 1], -6 / h[i - 1] - 6 / h[i], 6 / h[i]
    a[0, :3] = -1 / h[0], 1 / h[0] + 1 / h[1], -1 / h[1]
    a[-1, -3:] = -1 / h[-2], 1 / h[-2] + 1 / h[-1], -1 / h[-1]
    second = np.linalg.solve(a, b)  # [n nodes' M, n values]
    i = int(np.clip(np.searchsorted(x, beta, side="right") - 1, 0, n - 2))
    width, left, right = h[i], x[i + 1] - beta, beta - x[i]
    values = np.zeros((n, n))
    values[i, i] = left / width
    values[i + 1, i + 1] = right / width
    weights = (
        (second[i] * (left**3 - width**2 * left) + second[i + 1] * (right**3 - width**2 * right))
        / (6 * width)
        + values[i]
        + values[i + 1]
    )
    return tuple(float(w) for w in weights)


# ---- quantization: the integers a frame holds --------------------------------------------------------------


@dataclass(frozen=True)
class _Codes:
    top: np.ndarray  # [B] float16
    indices: np.ndarray  # [B, k] int64
    gaps: np.ndarray  # [B, k] int64, 0 .. _GAP_CODES
    tail: np.ndarray  # [B, 4] int64, 0 .. _TAIL_CODES


def _gap_codes(gaps: np.ndarray) -> np.ndarray:
    return np.rint(np.sqrt(np.clip(gaps, 0.0, _GAP_RANGE) / _GAP_RANGE) * _GAP_CODES).astype(np.int64)


def _tail_codes(tail: np.ndarray) -> np.ndarray:
    scaled = np.rint((np.nan_to_num(tail, neginf=-_TAIL_OFFSET) + _TAIL_OFFSET) * _TAIL_STEPS_PER_UNIT)
    return np.clip(scaled, 0, _TAIL_CODES).astype(np.int64)


def _compact_from_codes(num_classes: int, codes: _Codes) -> CompactLogits:
    gaps = (codes.gaps.astype(np.float64) / _GAP_CODES) ** 2 * _GAP_RANGE
    tail = codes.tail.astype(np.float64) / _TAIL_STEPS_PER_UNIT - _TAIL_OFFSET
    return CompactLogits(
        num_classes,
        torch.from_numpy(codes.top.astype(np.float32)),
        torch.from_numpy(codes.indices.astype(np.int64)),
        torch.from_numpy(gaps.astype(np.float32)),
        torch.from_numpy(tail.astype(np.float32)),
    )


def _codes_of(compact: CompactLogits) -> _Codes:
    return _Codes(
        compact.top.detach().cpu().numpy().astype(np.float16),
        compact.indices.detach().cpu().numpy().astype(np.int64),
        _gap_codes(compact.gaps.detach().cpu().double().numpy()),
        _tail_codes(compact.tail.detach().cpu().double().numpy()),
    )


def compress(logits: torch.Tensor, entries: int | None = None) -> CompactLogits:
    """The compact form of logits [B, C], exactly as decoding its frames gives it back; `entries` (k)
    defaults to as many as fit in `COMPACT_BYTES`."""
    if logits.dim() != 2:
        raise ValueError(f"compress needs logits [batch, classes]; got shape {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"the compact form holds 2 to {MAX_CLASSES} classes; got {num_classes}")
    k = entries_that_fit(num_classes) if entries is None else entries
    if not 1 <= k <= min(num_classes, MAX_ENTRIES):
        raise ValueError(f"entries must be in 1..{min(num_classes, MAX_ENTRIES)}; got {k}")
    exact = logits.detach().cpu().double()
    kept = exact.topk(k, dim=1)
    top = kept.values[:, 0].numpy().astype(np.float16)
    # Gaps are taken from the stored (fp16) largest logit, so that values = top - gaps stay consistent.
    gaps_from_stored = torch.from_numpy(top.astype(np.float64)).unsqueeze(1) - kept.values
    tail = torch.full((exact.shape[0], len(INVERSE_TEMPERATURES)), -math.inf, dtype=torch.float64)
    if k < num_classes:
        below = exact - kept.values[:, :1]
        below.scatter_(1, kept.indices, -math.inf)
        betas = torch.tensor(INVERSE_TEMPERATURES, dtype=torch.float64)
        tail = torch.logsumexp(below.unsqueeze(1) * betas.view(1, -1, 1), dim=2)
    codes = _Codes(top, kept.indices.numpy(), _gap_codes(gaps_from_stored.numpy()), _tail_codes(tail.numpy()))
    return _compact_from_codes(num_classes, codes)


# ---- frames -----------------------------------------------------------------------------------------------


def _bit_matrix(values: np.ndarray, bits: int) -> np.ndarray:
    """[B, k] non-negative ints -> [B, k * bits] of 0/1, most significant bit first."""
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    return ((values[..., None] >> shifts) & 1).reshape(values.shape[0], -1).astype(np.uint8)


def _from_bits(bits_matrix: np.ndarray, bits: int) -> np.ndarray:
    weights = 1 << np.arange(bits - 1, -1, -1, dtype=np.int64)
    return (bits_matrix.reshape(bits_matrix.shape[0], -1, bits).astype(np.int64) * weights).sum(axis=2)


def encode(compact: CompactLogits) -> list[bytes]:
    """One frame per row of `compact` (see the module doc)."""
    codes = _codes_of(compact)
    bits = index_bits(compact.num_classes)
    entries = np.concatenate([_bit_matrix(codes.indices, bits), _bit_matrix(codes.gaps, _GAP_BITS)], axis=1)
    # Interleave per entry: index bits then gap bits, entry after entry.
    k = compact.entries
    per_entry = np.concatenate(
        [entries[:, : k * bits].reshape(-1, k, bits), entries[:, k * bits :].reshape(-1, k, _GAP_BITS)],
        axis=2,
    )
    packed = np.packbits(per_entry.reshape(len(compact), -1), axis=1)
    frames = []
    for row in range(len(compact)):
        body = (
            _HEADER.pack(
                MAGIC, FORMAT_VERSION, compact.num_classes, k, codes.top[row], *codes.tail[row].tolist()
            )
            + packed[row].tobytes()
        )
        frames.append(body + _CHECKSUM.pack(xxhash.xxh32_intdigest(body)))
    return frames


def frames_tensor(compact: CompactLogits) -> torch.Tensor:
    """The frames of `compact`'s rows as uint8 [rows, frame bytes] (rows of one CompactLogits share a length):
    how a batch of them travels in an InferResponse."""
    return torch.frombuffer(bytearray(b"".join(encode(compact))), dtype=torch.uint8).view(len(compact), -1)


def from_frames(frames: torch.Tensor) -> CompactLogits:
    """The CompactLogits of uint8 [rows, frame bytes] frames; CorruptValueError for any damaged row."""
    if frames.dtype != torch.uint8 or frames.dim() != 2 or frames.shape[0] == 0:
        raise CorruptValueError(
            f"compact frames must be uint8 [rows, bytes]; got {frames.dtype} {tuple(frames.shape)}"
        )
    data = frames.contiguous().numpy().tobytes()
    width = frames.shape[1]
    return CompactLogits.cat(
        [decode(data[row * width : (row + 1) * width]) for row in range(frames.shape[0])]
    )


def is_compact_frame(data: bytes | memoryview) -> bool:
    """Whether `data` claims to be a compact frame (its first byte); `decode` checks the rest."""
    return len(data) > 0 and data[0] == MAGIC


def decode(data: bytes | memoryview) -> CompactLogits:
    """The one-row CompactLogits of a frame. CorruptValueError for anything but one intact frame."""
    view = memoryview(data)
    if len(view) < FIXED_BYTES:
        raise CorruptValueError(f"compact frame truncated: {len(view)} bytes, shorter than {FIXED_BYTES}")
    magic, version, num_classes, k, top, *tail = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise CorruptValueError(f"bad compact magic {magic:#04x}; expected {MAGIC:#04x}")
    if version != FORMAT_VERSION:
        raise CorruptValueError(f"unknown compact format version {version}; this reads {FORMAT_VERSION}")
    if num_classes < 2 or not 1 <= k <= min(num_classes, MAX_ENTRIES):
        raise CorruptValueError(f"compact frame claims {k} entries of {num_classes} classes")
    expected = frame_bytes(num_classes, k)
    if len(view) != expected:
        raise CorruptValueError(
            f"compact frame of {len(view)} bytes; {k} entries of {num_classes} need {expected}"
        )
    (checksum,) = _CHECKSUM.unpack_from(view, expected - _CHECKSUM.size)
    if xxhash.xxh32_intdigest(view[: expected - _CHECKSUM.size]) != checksum:
        raise CorruptValueError("compact frame checksum mismatch")
    bits = index_bits(num_classes)
    packed = np.frombuffer(view[_HEADER.size : expected - _CHECKSUM.size], dtype=np.uint8)
    unpacked = np.unpackbits(packed)[: k * (bits + _GAP_BITS)].reshape(1, k, bits + _GAP_BITS)
    indices = _from_bits(unpacked[:, :, :bits].reshape(1, -1), bits)
    if (indices >= num_classes).any() or len(np.unique(indices)) != k:
        raise CorruptValueError("compact frame holds an out-of-range or repeated class index")
    codes = _Codes(
        np.array([top], dtype=np.float16),
        indices,
        _from_bits(unpacked[:, :, bits:].reshape(1, -1), _GAP_BITS),
        np.array([tail], dtype=np.int64),
    )
    return _compact_from_codes(num_classes, codes)
