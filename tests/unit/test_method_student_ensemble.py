"""Ensemble of small students (trainer/methods/student_ensemble.py): per-student loss by hand, averaged soft
targets, independent training, vote and average prediction, builder checks."""

import math

import pytest
import torch
import torch.nn.functional as F
from method_support import FixedLogits, softmax, teacher_infos
from pydantic import ValidationError
from torch import nn

from trainer.methods import create_method
from trainer.methods.base import TeacherOutputs, TrainingClock
from trainer.methods.student_ensemble import (
    StudentEnsemble,
    StudentEnsembleParams,
    build_student_ensemble,
    combine_predictions,
)
from trainer.students import StudentConfig

NUM_CLASSES = 10
CLOCK = TrainingClock(epoch=0.0, total_epochs=1)
TWO_TINY_STUDENTS = [
    StudentConfig(arch="small_cnn", options={"channels": [4, 8], "kernel_size": 3, "fc_width": 16}),
    StudentConfig(arch="small_cnn", options={"channels": [6, 6], "kernel_size": 5, "fc_width": 8}),
]


def build(num_classes: int = NUM_CLASSES, teachers: int = 1, **fields) -> StudentEnsemble:
    params = StudentEnsembleParams(**{"students": TWO_TINY_STUDENTS, **fields})
    return build_student_ensemble(
        params, num_classes=num_classes, in_chans=3, teachers=teacher_infos(teachers, num_classes)
    )


@pytest.mark.parametrize("soft_term_t2", [False, True])
def test_loss_is_the_sum_of_each_students_hand_computed_cross_entropies_on_2x3_logits(soft_term_t2):
    students = [[[1.0, 2.0, 0.5], [0.0, -1.0, 1.0]], [[0.3, 0.0, -0.4], [2.0, 1.0, 0.0]]]
    teacher = [[2.0, 0.0, 1.0], [0.0, 1.0, 3.0]]
    labels = [1, 2]
    temperature, alpha = 2.0, 0.75
    method = build(num_classes=3, temperature=temperature, alpha=alpha, soft_term_t2=soft_term_t2)
    method.students = nn.ModuleList(FixedLogits(s) for s in students)

    expected_total = 0.0
    expected_terms = {}
    for i, student in enumerate(students):
        hard = sum(-math.log(softmax(s)[y]) for s, y in zip(student, labels)) / 2
        soft = (
            sum(
                -sum(p * math.log(q) for p, q in zip(softmax(t, temperature), softmax(s, temperature)))
                for s, t in zip(student, teacher)
            )
            / 2
            * (temperature**2 if soft_term_t2 else 1.0)
        )
        expected_total += alpha * hard + (1 - alpha) * soft
        expected_terms |= {f"ce_{i}": hard, f"soft_ce_{i}": soft}

    result = method.training_loss(
        torch.zeros(2, 3, 16, 16), torch.tensor(labels), TeacherOutputs(logits=[torch.tensor(teacher)]), CLOCK
    )

    assert result.loss.item() == pytest.approx(expected_total, rel=1e-5)
    assert result.terms == pytest.approx(expected_terms, rel=1e-5)


def test_soft_target_averages_teacher_probabilities_not_logits():
    teachers = [torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([[0.0, 4.0, 0.0]])]
    method = build(num_classes=3, teachers=2, temperature=1.0, alpha=0.0)
    method.students = nn.ModuleList([FixedLogits([[0.5, 0.0, 1.0]]), FixedLogits([[0.5, 0.0, 1.0]])])
    log_q = F.log_softmax(torch.tensor([[0.5, 0.0, 1.0]]), dim=1)

    averaged_probs = (F.softmax(teachers[0], 1) + F.softmax(teachers[1], 1)) / 2
    softmax_of_averaged_logits = F.softmax((teachers[0] + teachers[1]) / 2, 1)
    images, labels = torch.zeros(1, 3, 16, 16), torch.tensor([0])
    result = method.training_loss(images, labels, TeacherOutputs(logits=teachers), CLOCK)

    assert result.terms["soft_ce_0"] == pytest.approx(-(averaged_probs * log_q).sum().item(), rel=1e-5)
    from_averaged_logits = -(softmax_of_averaged_logits * log_q).sum().item()
    assert result.terms["soft_ce_0"] != pytest.approx(from_averaged_logits, rel=1e-2)


def test_students_train_independently_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    method = build(teachers=2)
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 3, 7, 9])
    teachers = TeacherOutputs(logits=[torch.randn(4, NUM_CLASSES), torch.randn(4, NUM_CLASSES)])

    method.training_loss(images, labels, teachers, CLOCK).loss.backward()
    for name, param in method.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    grads_from_sum = [p.grad.clone() for p in method.students[0].parameters()]

    # Student 0's own loss alone gives it the same gradient: the sum trains each student on its own.
    method.zero_grad()
    target = (F.softmax(teachers.logits[0] / 10, 1) + F.softmax(teachers.logits[1] / 10, 1)) / 2
    s = method.students[0](images)
    soft_ce = -(target * F.log_softmax(s / 10, 1)).sum(1).mean()
    alone = 0.75 * F.cross_entropy(s, labels) + 0.25 * soft_ce  # the paper's loss: no T² by default
    alone.backward()
    for from_sum, param in zip(grads_from_sum, method.students[0].parameters()):
        torch.testing.assert_close(param.grad, from_sum)


def test_vote_and_average_differ_when_a_confident_minority_outweighs_the_majority():
    lukewarm_zero = torch.tensor([[0.4, 0.3, 0.3]]).log()
    confident_one = torch.tensor([[0.005, 0.99, 0.005]]).log()
    student_logits = [lukewarm_zero, lukewarm_zero, confident_one]

    assert combine_predictions(student_logits, "vote").argmax(1).item() == 0
    assert combine_predictions(student_logits, "average").argmax(1).item() == 1
    torch.testing.assert_close(
        combine_predictions(student_logits, "average"), torch.tensor([[0.805, 1.59, 0.605]]) / 3
    )


def test_vote_scores_count_votes_and_ties_go_to_the_higher_averaged_probability():
    votes_for_two = torch.tensor([[0.1, 0.2, 0.7]]).log()
    votes_for_two_narrowly = torch.tensor([[0.05, 0.45, 0.5]]).log()
    votes_for_one = torch.tensor([[0.1, 0.8, 0.1]]).log()

    majority = combine_predictions([votes_for_two, votes_for_two_narrowly, votes_for_one], "vote")
    assert majority.floor().tolist() == [[0.0, 1.0, 2.0]]

    tie = combine_predictions([votes_for_two, votes_for_one], "vote")  # one vote each; mean p: 0.45 vs 0.4
    assert tie.argmax(1).item() == 1


def test_predict_uses_the_configured_combination():
    students = [[[0.4, 0.3, 0.3]], [[0.4, 0.3, 0.3]], [[0.005, 0.99, 0.005]]]
    predictions = {}
    for combine in ("vote", "average"):
        method = build(num_classes=3, combine=combine)
        method.students = nn.ModuleList(FixedLogits(torch.tensor(s).log().tolist()) for s in students)
        predictions[combine] = method.predict(torch.zeros(1, 3, 16, 16)).argmax(1).item()
    assert predictions == {"vote": 0, "average": 1}


def test_contract_outputs_and_export():
    method = create_method(
        StudentEnsembleParams(students=TWO_TINY_STUDENTS),
        num_classes=NUM_CLASSES,
        in_chans=3,
        teachers=teacher_infos(2),
    )
    assert method.teacher_outputs() == [["logits"], ["logits"]]
    exported = method.exported_students()
    assert (
        list(exported)
        == ["student_0", "student_1", "ensemble_vote"]
        == [*method.alone_networks(), "ensemble_vote"]
    )
    assert exported["student_0"] is method.students[0] and exported["student_1"] is method.students[1]
    assert method.headline() == "ensemble_vote"
    images = torch.randn(4, 3, 16, 16)
    method.eval()
    with torch.no_grad():  # the exported vote is the method's prediction
        torch.testing.assert_close(exported["ensemble_vote"](images), method.predict(images))


def test_defaults_are_the_papers_best_mnist_setting_with_differing_small_cnns():
    params = StudentEnsembleParams()
    assert (params.temperature, params.alpha, params.combine) == (10.0, 0.75, "vote")
    options = [s.options for s in params.students]
    assert len(options) >= 2 and all(s.arch == "small_cnn" for s in params.students)
    assert len({o["kernel_size"] for o in options}) > 1 and len({o["fc_width"] for o in options}) > 1


@pytest.mark.parametrize(
    ("teachers", "weights", "message"),
    [
        (teacher_infos(0), None, "at least 1 teacher"),
        (teacher_infos(2), [1.0], "1 teacher_weights for 2 teachers"),
        (teacher_infos(1, num_classes=100), None, "predicts 100 classes, the student 10"),
    ],
)
def test_builder_rejects_teachers_that_do_not_fit(teachers, weights, message):
    params = StudentEnsembleParams(students=TWO_TINY_STUDENTS, teacher_weights=weights)
    with pytest.raises(ValueError, match=message):
        build_student_ensemble(params, num_classes=NUM_CLASSES, in_chans=3, teachers=teachers)


def test_builder_reports_a_student_option_the_architecture_does_not_take():
    params = StudentEnsembleParams(
        students=[TWO_TINY_STUDENTS[0], StudentConfig(arch="small_cnn", options={"depth": 3})]
    )
    with pytest.raises(ValueError, match="rejected options"):
        build_student_ensemble(params, num_classes=NUM_CLASSES, in_chans=3, teachers=teacher_infos(1))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"students": TWO_TINY_STUDENTS[:1]}, "at least 2 items"),
        ({"combine": "median"}, "'vote' or 'average'"),
        ({"alpha": -0.1}, "greater than or equal to 0"),
        ({"teacher_weights": [-1.0]}, "non-negative with a positive sum"),
        ({"students_count": 3}, "Extra inputs are not permitted"),
    ],
)
def test_params_reject_bad_values(fields, message):
    with pytest.raises(ValidationError, match=message):
        StudentEnsembleParams(**fields)
