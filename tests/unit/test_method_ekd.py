"""EKD (trainer/methods/ekd.py): the loss by hand from the branches' own outputs, one teacher per branch, the
optional feature term, gradients, ensemble prediction, builder checks."""

import pytest
import torch
import torch.nn.functional as F
from method_support import unit_bn_scales
from pydantic import ValidationError

from trainer.methods import create_method
from trainer.methods.base import TeacherInfo, TeacherOutputs, TrainingClock
from trainer.methods.ekd import EKDParams, EnsembleKnowledgeDistillation, build_ekd
from trainer.students import MultiBranchResNet, count_parameters

NUM_CLASSES = 10
CLOCK = TrainingClock(epoch=0.0, total_epochs=1)
TAP = "layer2"
TAP_SHAPE = (32, 2, 2)  # deliberately not the student's last-stage shape (64, 4, 4 for 16x16 images)


def teacher_infos(count: int, num_classes: int = NUM_CLASSES) -> list[TeacherInfo]:
    return [
        TeacherInfo(name=f"teacher{i}", num_classes=num_classes, feature_shapes={TAP: TAP_SHAPE})
        for i in range(count)
    ]


def build(num_classes: int = NUM_CLASSES, teachers: int = 2, **fields) -> EnsembleKnowledgeDistillation:
    params = EKDParams(**{"depth": 8, **fields})
    return build_ekd(
        params, num_classes=num_classes, in_chans=3, teachers=teacher_infos(teachers, num_classes)
    )


def hand_kl(target: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T²·KL(target ‖ softmax(s/T)), averaged over the batch, without torch.nn.functional's KL."""
    log_q = student_logits / temperature - (student_logits / temperature).exp().sum(1, keepdim=True).log()
    return (target * (target.log() - log_q)).sum(1).mean() * temperature**2


def hand_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    log_p = logits - logits.exp().sum(1, keepdim=True).log()
    return -log_p[torch.arange(len(labels)), labels].mean()


def test_loss_matches_hand_computation_from_the_branch_logits_on_2x3():
    torch.manual_seed(0)
    temperature, alpha = 2.0, 0.3
    method = build(num_classes=3, temperature=temperature, alpha=alpha)
    images, labels = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    teacher_logits = [
        torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 3.0]]),
        torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, -1.0]]),
    ]

    result = method.training_loss(images, labels, TeacherOutputs(logits=teacher_logits), CLOCK)

    # Train-mode BN normalizes with batch statistics, so the same batch gives the same logits again.
    with torch.no_grad():
        branches = method.student.forward_branches(images).logits
    expected = hand_ce(torch.stack(branches).mean(0), labels)
    for i, (b, t) in enumerate(zip(branches, teacher_logits)):
        teacher_probs = (t / temperature).exp() / (t / temperature).exp().sum(1, keepdim=True)
        kd = hand_kl(teacher_probs, b, temperature)
        expected = expected + alpha * hand_ce(b, labels) + (1 - alpha) * kd
        assert result.terms[f"ce_{i}"] == pytest.approx(hand_ce(b, labels).item(), rel=1e-5)
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert result.terms["ce_ensemble"] == pytest.approx(
        hand_ce(torch.stack(branches).mean(0), labels).item(), rel=1e-5
    )


def test_each_branch_distills_its_own_teacher_not_an_average():
    torch.manual_seed(0)
    method = build(num_classes=3, temperature=1.0)
    images, labels = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    teacher_logits = [torch.tensor([[4.0, 0.0, 0.0]] * 2), torch.tensor([[0.0, 4.0, 0.0]] * 2)]

    result = method.training_loss(images, labels, TeacherOutputs(logits=teacher_logits), CLOCK)

    with torch.no_grad():
        branches = method.student.forward_branches(images).logits
    own = [F.softmax(t, 1) for t in teacher_logits]
    averaged = (own[0] + own[1]) / 2
    for i in range(2):
        assert result.terms[f"kd_{i}"] == pytest.approx(hand_kl(own[i], branches[i], 1.0).item(), rel=1e-5)
        assert result.terms[f"kd_{i}"] != pytest.approx(hand_kl(averaged, branches[i], 1.0).item(), rel=1e-2)


def test_feature_term_is_the_mse_of_adapted_pooled_branch_maps_to_detached_teacher_maps():
    torch.manual_seed(0)
    method = build(feature_tap=TAP, feature_weight=2.5)
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 3, 7, 9])
    logits = [torch.randn(4, NUM_CLASSES), torch.randn(4, NUM_CLASSES)]
    maps = [torch.randn(4, *TAP_SHAPE, requires_grad=True) for _ in range(2)]
    without_features = build()
    without_features.student.load_state_dict(method.student.state_dict())

    teachers = TeacherOutputs(logits=logits, features=[{TAP: m} for m in maps])
    result = method.training_loss(images, labels, teachers, CLOCK)
    base = without_features.training_loss(images, labels, TeacherOutputs(logits=logits), CLOCK)
    result.loss.backward()

    with torch.no_grad():
        last_maps = [f[-1] for f in method.student.forward_branches(images).stage_features]
        expected = []
        for adapter, student_map, teacher_map in zip(method.adapters, last_maps, maps):
            adapted = adapter(student_map)  # [4, 32, 4, 4]; 2x2 average pooling gives the teacher's 2x2
            pooled = adapted.reshape(4, 32, 2, 2, 2, 2).mean((3, 5))
            expected.append(((pooled - teacher_map) ** 2).mean().item())
    assert [result.terms["feature_0"], result.terms["feature_1"]] == pytest.approx(expected, rel=1e-5)
    assert result.loss.item() == pytest.approx(base.loss.item() + 2.5 * sum(expected), rel=1e-5)
    assert all(m.grad is None for m in maps)


@pytest.mark.parametrize("fields", [{}, {"feature_tap": TAP, "feature_weight": 1.0}])
def test_every_learnable_parameter_gets_a_gradient(fields):
    torch.manual_seed(0)
    method = build(**fields)
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 3, 7, 9])
    teachers = TeacherOutputs(
        logits=[torch.randn(4, NUM_CLASSES) for _ in range(2)],
        features=[{TAP: torch.randn(4, *TAP_SHAPE)} for _ in range(2)],
    )

    method.training_loss(images, labels, teachers, CLOCK).loss.backward()

    assert len(method.adapters) == (2 if fields else 0)
    for name, param in method.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_predicts_with_the_mean_of_branch_logits_and_exports_the_whole_trunk():
    torch.manual_seed(0)
    method = create_method(
        EKDParams(depth=8, shared_stages=2), num_classes=NUM_CLASSES, in_chans=3, teachers=teacher_infos(3)
    )
    method.eval()
    images = torch.randn(4, 3, 16, 16)
    branches = method.student.forward_branches(images).logits

    assert len(branches) == 3
    torch.testing.assert_close(method.predict(images), (branches[0] + branches[1] + branches[2]) / 3)
    exported = method.exported_students()
    assert list(exported) == ["ekd_student", "branch_0", "branch_1", "branch_2"]
    assert method.headline() == "ekd_student" and isinstance(exported["ekd_student"], MultiBranchResNet)
    assert exported["ekd_student"].branch_widths == (1.0, 1.0, 1.0)
    for index in range(3):  # each branch deploys alone, and its CE baseline is the same network
        torch.testing.assert_close(exported[f"branch_{index}"](images), branches[index])
        baseline = method.alone_networks()[f"branch_{index}"].build(NUM_CLASSES, 3)
        assert count_parameters(baseline) == count_parameters(exported[f"branch_{index}"])


def test_teacher_outputs_ask_for_the_tap_only_when_the_feature_term_is_on():
    assert build().teacher_outputs() == [["logits"], ["logits"]]
    assert build(feature_tap=TAP, feature_weight=1.0).teacher_outputs() == [["logits", TAP], ["logits", TAP]]


def test_defaults():
    params = EKDParams()
    assert (params.depth, params.shared_stages, params.temperature, params.alpha) == (20, 1, 4.0, 0.5)
    assert (params.feature_tap, params.feature_weight) == (None, 0.0)


def test_builder_rejects_teachers_that_do_not_fit():
    with pytest.raises(ValueError, match="at least 2 teacher"):
        build(teachers=1)
    with pytest.raises(ValueError, match="predicts 100 classes, the student 10"):
        build_ekd(
            EKDParams(depth=8),
            num_classes=NUM_CLASSES,
            in_chans=3,
            teachers=[*teacher_infos(1), *teacher_infos(1, num_classes=100)],
        )
    with pytest.raises(ValueError, match=f"has no feature tap 'layer9'; its taps: {TAP}"):
        build(feature_tap="layer9", feature_weight=1.0)


def test_training_loss_rejects_missing_teacher_outputs():
    method = build(feature_tap=TAP, feature_weight=1.0)
    images, labels = torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.long)
    logits = [torch.randn(4, NUM_CLASSES) for _ in range(2)]
    with pytest.raises(ValueError, match="logits of its 2 teacher"):
        method.training_loss(images, labels, TeacherOutputs(logits=logits[:1]), CLOCK)
    with pytest.raises(ValueError, match=f"feature map '{TAP}' from each of its 2 teachers"):
        method.training_loss(images, labels, TeacherOutputs(logits=logits), CLOCK)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"depth": 9}, "depth must be 6n\\+2"),
        ({"shared_stages": 3}, "less than or equal to 2"),
        ({"feature_tap": TAP}, "needs both a tap and a positive weight"),
        ({"feature_weight": 1.0}, "needs both a tap and a positive weight"),
        ({"feature_weight": -1.0}, "greater than or equal to 0"),
        ({"alpha": 2.0}, "less than or equal to 1"),
        ({"branches": 3}, "Extra inputs are not permitted"),
    ],
)
def test_params_reject_bad_values(fields, message):
    with pytest.raises(ValidationError, match=message):
        EKDParams(**fields)


@pytest.mark.parametrize("fields", [{}, {"feature_tap": TAP, "feature_weight": 1.0}])
def test_imagenet_trunk_shares_all_but_layer4_and_trains_every_parameter(fields):
    torch.manual_seed(0)
    params = EKDParams(trunk="imagenet_resnet", arch="resnet50", **fields)
    method = build_ekd(params, num_classes=4, in_chans=3, teachers=teacher_infos(2, num_classes=4))
    unit_bn_scales(method)
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([0, 3])
    teachers = TeacherOutputs(
        logits=[torch.randn(2, 4) for _ in range(2)],
        features=[{TAP: torch.randn(2, *TAP_SHAPE)} for _ in range(2)],
    )

    method.training_loss(images, labels, teachers, CLOCK).loss.backward()

    assert params.shared_stages == 3
    assert [name for name, _ in method.student.shared.named_children()] == ["layer1", "layer2", "layer3"]
    assert [branch.fc.in_features for branch in method.student.branches] == [2048, 2048]
    for name, param in method.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    exported = method.exported_students()["ekd_student"].eval()
    with torch.no_grad():
        assert exported(images).shape == (2, 4)


def test_imagenet_trunk_takes_shared_stages_up_to_3():
    assert EKDParams(trunk="imagenet_resnet", shared_stages=1).shared_stages == 1
    with pytest.raises(ValidationError, match="(?s)shared_stages.*less than or equal to 3"):
        EKDParams(trunk="imagenet_resnet", shared_stages=4)
