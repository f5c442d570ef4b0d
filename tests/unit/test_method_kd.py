"""Hinton KD (trainer/methods/kd.py): the loss by hand, averaged soft targets, gradients, builder checks."""

import math

import pytest
import torch
import torch.nn.functional as F
from method_support import FixedLogits, softmax, teacher_infos
from pydantic import ValidationError

from trainer.methods import create_method
from trainer.methods.base import TeacherOutputs, TrainingClock
from trainer.methods.kd import KDParams, KnowledgeDistillation, build_kd
from trainer.students import StudentConfig

NUM_CLASSES = 10
CLOCK = TrainingClock(epoch=0.0, total_epochs=1)
TINY_STUDENT = StudentConfig(arch="cifar_resnet8")


def test_loss_matches_hand_computation_on_2x3_logits_with_weighted_teachers():
    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 1.0]]
    labels = [1, 2]
    teacher_a = [[2.0, 0.0, 1.0], [0.0, 1.0, 3.0]]
    teacher_b = [[0.0, 1.0, 0.0], [1.0, 1.0, -1.0]]
    temperature, alpha = 2.0, 0.3
    params = KDParams(student=TINY_STUDENT, temperature=temperature, alpha=alpha, teacher_weights=[3.0, 1.0])
    method = build_kd(params, num_classes=3, in_chans=3, teachers=teacher_infos(2, num_classes=3))
    method.student = FixedLogits(student)

    ce = sum(-math.log(softmax(s)[y]) for s, y in zip(student, labels)) / 2
    kl = 0.0
    for s, ta, tb in zip(student, teacher_a, teacher_b):
        target = [0.75 * pa + 0.25 * pb for pa, pb in zip(softmax(ta, temperature), softmax(tb, temperature))]
        kl += sum(p * (math.log(p) - math.log(q)) for p, q in zip(target, softmax(s, temperature)))
    kd = temperature**2 * kl / 2
    expected = alpha * ce + (1 - alpha) * kd

    teacher_outputs = TeacherOutputs(logits=[torch.tensor(teacher_a), torch.tensor(teacher_b)])
    result = method.training_loss(torch.zeros(2, 3, 16, 16), torch.tensor(labels), teacher_outputs, CLOCK)

    assert result.loss.item() == pytest.approx(expected, rel=1e-5)
    assert result.terms["ce"] == pytest.approx(ce, rel=1e-5)
    assert result.terms["kd"] == pytest.approx(kd, rel=1e-5)


def test_soft_target_averages_teacher_probabilities_not_logits():
    temperature = 1.0
    teachers = [torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([[0.0, 4.0, 0.0]])]
    method = build_kd(
        KDParams(student=TINY_STUDENT, temperature=temperature, alpha=0.0),
        num_classes=3,
        in_chans=3,
        teachers=teacher_infos(2, num_classes=3),
    )
    method.student = FixedLogits([[0.5, 0.0, 1.0]])
    log_q = F.log_softmax(method.student.logits.detach(), dim=1)

    def kl_to(target: torch.Tensor) -> float:
        return (target * (target.log() - log_q)).sum().item()

    averaged_probs = (F.softmax(teachers[0], 1) + F.softmax(teachers[1], 1)) / 2
    softmax_of_averaged_logits = F.softmax((teachers[0] + teachers[1]) / 2, 1)
    images, labels = torch.zeros(1, 3, 16, 16), torch.tensor([0])
    result = method.training_loss(images, labels, TeacherOutputs(logits=teachers), CLOCK)

    assert result.loss.item() == pytest.approx(kl_to(averaged_probs), rel=1e-5)
    assert abs(kl_to(averaged_probs) - kl_to(softmax_of_averaged_logits)) > 0.1


def test_loss_of_a_real_student_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    method = build_kd(
        KDParams(student=TINY_STUDENT), num_classes=NUM_CLASSES, in_chans=3, teachers=teacher_infos(2)
    )
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 3, 7, 9])
    teacher_logits = [torch.randn(4, NUM_CLASSES), torch.randn(4, NUM_CLASSES)]

    result = method.training_loss(images, labels, TeacherOutputs(logits=teacher_logits), CLOCK)
    result.loss.backward()

    # Train-mode BN normalizes with batch statistics, so the same batch gives the same logits again.
    with torch.no_grad():
        s = method.student(images)
    target = sum(F.softmax(t / 4.0, 1) for t in teacher_logits) / 2
    kl = (target * (target.log() - F.log_softmax(s / 4.0, 1))).sum(1).mean() * 16.0
    expected = 0.5 * F.cross_entropy(s, labels) + 0.5 * kl
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for name, param in method.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_contract_outputs_predict_and_export():
    method = create_method(
        KDParams(student=TINY_STUDENT), num_classes=NUM_CLASSES, in_chans=3, teachers=teacher_infos(2)
    )
    assert isinstance(method, KnowledgeDistillation)
    assert method.teacher_outputs() == [["logits"], ["logits"]]
    assert method.exported_students() == {"student": method.student}
    method.eval()
    images = torch.randn(4, 3, 16, 16)
    assert torch.equal(method.predict(images), method.student(images))


def test_defaults_are_hinton_t4_half_half():
    params = KDParams()
    assert (params.temperature, params.alpha, params.teacher_weights) == (4.0, 0.5, None)


@pytest.mark.parametrize(
    ("teachers", "weights", "message"),
    [
        (teacher_infos(0), None, "at least 1 teacher"),
        (teacher_infos(2), [1.0, 2.0, 3.0], "3 teacher_weights for 2 teachers"),
        (teacher_infos(1, num_classes=100), None, "predicts 100 classes, the student 10"),
    ],
)
def test_builder_rejects_teachers_that_do_not_fit(teachers, weights, message):
    params = KDParams(student=TINY_STUDENT, teacher_weights=weights)
    with pytest.raises(ValueError, match=message):
        build_kd(params, num_classes=NUM_CLASSES, in_chans=3, teachers=teachers)


def test_training_loss_rejects_missing_or_miscounted_teacher_logits():
    method = build_kd(
        KDParams(student=TINY_STUDENT), num_classes=NUM_CLASSES, in_chans=3, teachers=teacher_infos(2)
    )
    images, labels = torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="logits of its 2 teacher"):
        method.training_loss(images, labels, None, CLOCK)
    with pytest.raises(ValueError, match="got 1 of 1"):
        method.training_loss(images, labels, TeacherOutputs(logits=[torch.randn(4, NUM_CLASSES)]), CLOCK)
    with pytest.raises(ValueError, match="got 1 of 2"):
        one_missing = TeacherOutputs(logits=[torch.randn(4, NUM_CLASSES), None])
        method.training_loss(images, labels, one_missing, CLOCK)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"alpha": 1.5}, "less than or equal to 1"),
        ({"temperature": 0}, "greater than 0"),
        ({"teacher_weights": [-1.0, 2.0]}, "non-negative with a positive sum"),
        ({"teacher_weights": [0.0, 0.0]}, "non-negative with a positive sum"),
        ({"beta": 0.5}, "Extra inputs are not permitted"),
        ({"student": {"arch": "resnet9000"}}, "unknown student architecture"),
    ],
)
def test_params_reject_bad_values(fields, message):
    with pytest.raises(ValidationError, match=message):
        KDParams(**fields)
