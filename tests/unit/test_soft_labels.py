"""The compact soft-label form: frames, what they decode to, and the KD terms that read it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.formats import quantized_logits
from services.formats.codec import CorruptValueError
from services.formats.soft_labels import COMPACT_BYTES, CompactLogits, compress, decode, encode
from trainer.config import load_experiment
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


def long_tailed(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher, student) logits [batch, 1000] shaped like benchmarks/soft_labels.py's: a heavy-tailed bulk,
    one dominant class and a few related ones; the student correlated with the teacher."""
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.distributions.StudentT(4.0).sample((batch, 1000)) * 1.6
    rows = torch.arange(batch)
    teacher[rows, torch.randint(0, 1000, (batch,), generator=generator)] += 11
    for _ in range(3):
        teacher[rows, torch.randint(0, 1000, (batch,), generator=generator)] += 4.5
    return teacher, 0.8 * teacher + torch.randn(batch, 1000, generator=generator)


def test_a_quantized_frame_is_half_of_fp16_and_decodes_to_what_quantized_gives():
    raw = logits(8, 1000) * 3
    frames = quantized_logits.encode(raw)
    assert {len(frame) for frame in frames} == {quantized_logits.frame_bytes(1000)} == {910}
    decoded = torch.stack([quantized_logits.decode(frame) for frame in frames])
    assert decoded.dtype == torch.float32 and torch.equal(decoded, quantized_logits.quantized(raw))
    assert torch.equal(decoded.argmax(1), raw.argmax(1)) and torch.allclose(
        decoded.max(1).values, raw.max(1).values
    )
    assert quantized_logits.encode(decoded) == frames  # a decoded row encodes to its own frame
    equal = torch.zeros(1, 10)  # no range: every gap is zero
    assert torch.equal(quantized_logits.decode(quantized_logits.encode(equal)[0]), equal[0])


def test_the_quantized_form_keeps_the_kd_loss_and_gradient_within_one_percent_at_t_1_to_4():
    teacher, student = long_tailed(128)
    stored = quantized_logits.quantized(teacher)
    for temperature in (1.0, 2.0, 4.0):
        losses, gradients = [], []
        for target_logits in (teacher, stored):
            scores = student.clone().requires_grad_(True)
            loss = distillation_kl(scores, soft_targets([target_logits], temperature), temperature)
            loss.backward()
            losses.append(loss.item())
            gradients.append(scores.grad)
        assert abs(losses[1] - losses[0]) / losses[0] < 0.01
        assert (gradients[1] - gradients[0]).norm() / gradients[0].norm() < 0.01


def test_damaged_truncated_or_foreign_quantized_frames_are_rejected():
    frame = bytearray(quantized_logits.encode(logits(1, 1000))[0])
    with pytest.raises(CorruptValueError, match="truncated"):
        quantized_logits.decode(bytes(frame[:10]))
    with pytest.raises(CorruptValueError, match="bytes"):
        quantized_logits.decode(bytes(frame[:-1]))
    for position in (200, len(frame) - 1):
        damaged = bytearray(frame)
        damaged[position] ^= 0x01
        with pytest.raises(CorruptValueError, match="checksum"):
            quantized_logits.decode(bytes(damaged))
    with pytest.raises(CorruptValueError, match="magic"):
        quantized_logits.decode(encode(compress(logits(1, 1000)))[0])
    with pytest.raises(ValueError, match="finite"):
        quantized_logits.encode(torch.tensor([[0.0, float("inf")]]))


def test_training_outputs_turn_quantized_when_asked():
    raw = logits(2, 1000)
    outputs = in_soft_label_form(TeacherOutputs(logits=[raw, None], features=[{}, {}]), "quantized")
    assert torch.equal(outputs.logits[0], quantized_logits.quantized(raw)) and outputs.logits[1] is None


def test_the_quantized_form_is_chosen_in_config_and_refused_where_the_service_would_serve_it():
    cfg = load_experiment("configs/digits/kd.yaml", ["teacher_source.soft_labels=quantized"])
    assert cfg.teacher_source.soft_labels == "quantized"
    served = [
        "teacher_source.soft_labels=quantized",
        "teacher_source.kind=served",
        "teacher_source.address=h:1",
    ]
    with pytest.raises(ValueError, match="'quantized' is taken in process or from a bank"):
        load_experiment("configs/digits/kd.yaml", served)
