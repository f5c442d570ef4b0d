"""The compact soft-label form: frames, what they decode to, and the KD terms that read it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.formats.codec import CorruptValueError
from services.formats.soft_labels import COMPACT_BYTES, CompactLogits, compress, decode, encode
from trainer.methods.base import TeacherOutputs, in_soft_label_form
from trainer.methods.losses import distillation_kl, soft_targets


def logits(batch: int, classes: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, classes, generator=torch.Generator().manual_seed(seed)) * 3


def test_a_1000_class_frame_fits_64_bytes_and_decodes_to_what_compress_gives():
    compact = compress(logits(8, 1000))
    frames = encode(compact)
    assert {len(frame) for frame in frames} == {63} and COMPACT_BYTES >= 63
    decoded = CompactLogits.cat([decode(frame) for frame in frames])
    for field in ("top", "indices", "gaps", "tail"):
        assert torch.equal(getattr(decoded, field), getattr(compact, field))
    assert encode(decoded) == frames


def test_kept_logits_are_the_largest_and_close():
    raw = logits(4, 1000)
    compact = compress(raw)
    assert torch.equal(compact.indices, raw.topk(16).indices)
    assert (compact.values - raw.topk(16).values).abs().max() < 0.02


def test_damaged_or_truncated_frames_are_rejected():
    frame = bytearray(encode(compress(logits(1, 1000)))[0])
    with pytest.raises(CorruptValueError, match="truncated|bytes"):
        decode(bytes(frame[:40]))
    frame[30] ^= 0x01
    with pytest.raises(CorruptValueError, match="checksum"):
        decode(bytes(frame))


def test_few_classes_are_kept_whole_and_the_kd_loss_matches_full_logits():
    teacher, student = logits(16, 10, 0), logits(16, 10, 1)
    compact = compress(teacher)
    assert compact.entries == 10 and not compact.has_tail
    for temperature in (1.0, 4.0):
        full = distillation_kl(student, soft_targets([teacher], temperature), temperature)
        from_compact = distillation_kl(
            student, soft_targets([compact], temperature, student_logits=student), temperature
        )
        assert from_compact.item() == pytest.approx(full.item(), rel=1e-2)


def test_the_tail_target_is_the_exact_mass_spread_like_the_student_and_has_no_gradient():
    teacher, student = logits(4, 1000, 0), logits(4, 1000, 1).requires_grad_(True)
    compact = compress(teacher)
    target = soft_targets([compact], 2.0, student_logits=student)
    assert not target.requires_grad
    assert torch.allclose(target.sum(1), torch.ones(4), atol=1e-5)
    exact = F.softmax(teacher / 2.0, dim=1)
    tail_mass = 1 - exact.gather(1, compact.indices).sum(1)
    in_tail = target.scatter(1, compact.indices, 0.0)
    assert torch.allclose(in_tail.sum(1), tail_mass, rtol=2e-3)
    with pytest.raises(ValueError, match="need the student's logits"):
        soft_targets([compact], 2.0)


def test_training_outputs_turn_compact_when_asked_and_move_like_tensors():
    outputs = TeacherOutputs(logits=[logits(2, 100), None])
    assert in_soft_label_form(outputs, "full") is outputs
    compact = in_soft_label_form(outputs, "compact")
    assert isinstance(compact.logits[0], CompactLogits) and compact.logits[1] is None
    assert isinstance(compact.to("cpu").logits[0], CompactLogits)
