import math

import pytest
import torch
import torch.nn.functional as F
from method_support import unit_bn_scales
from pydantic import ValidationError

from trainer.methods import create_method
from trainer.methods.base import TeacherInfo, TrainingClock
from trainer.methods.one import ONEParams, OnTheFlyNativeEnsemble, build_one, sigmoid_rampup

NUM_CLASSES = 10


# The gate's linear bias feeds a BatchNorm, which cancels any constant: its gradient is zero up to rounding
# (the official code keeps the bias all the same).
BN_CANCELLED = {"network.gate.linear.bias"}


@pytest.fixture
def method() -> OnTheFlyNativeEnsemble:
    torch.manual_seed(0)
    return build_one(ONEParams(depth=8, rampup_epochs=10.0), num_classes=NUM_CLASSES, in_chans=3, teachers=[])


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 16, 16, generator=generator), torch.tensor([0, 3, 7, 3])


def test_rampup_rises_from_exp_minus_5_to_one():
    assert sigmoid_rampup(0.0, 80.0) == pytest.approx(math.exp(-5.0))
    assert sigmoid_rampup(40.0, 80.0) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(80.0, 80.0) == 1.0
    assert sigmoid_rampup(200.0, 80.0) == 1.0
    assert sigmoid_rampup(3.0, 0.0) == 1.0


def test_gate_weights_are_a_distribution_per_sample(method, batch):
    images, _ = batch
    _, gate = method.network.forward_parts(images)
    assert gate.shape == (4, 3)
    assert (gate >= 0).all()
    torch.testing.assert_close(gate.sum(1), torch.ones(4))


def test_training_loss_matches_the_paper_equation_by_hand(method, batch):
    images, labels = batch
    with torch.no_grad():  # train-mode BN uses batch statistics, so a second forward gives the same values
        outputs, gate = method.network.forward_parts(images)
    logits = outputs.logits
    ensemble = sum(gate[:, i : i + 1] * logits[i] for i in range(3))
    temperature = 3.0
    target = F.softmax(ensemble / temperature, dim=1)
    kl = sum((target * (target.log() - F.log_softmax(z / temperature, dim=1))).sum(1).mean() for z in logits)
    weight = math.exp(-5.0 * (1.0 - 5.0 / 10.0) ** 2)
    expected = (
        sum(F.cross_entropy(z, labels) for z in logits)
        + F.cross_entropy(ensemble, labels)
        + weight * temperature**2 * kl
    )

    result = method.training_loss(images, labels, None, TrainingClock(epoch=5.0, total_epochs=20))

    torch.testing.assert_close(result.loss.detach(), expected)
    assert result.terms["kl_weight"] == pytest.approx(weight)
    # The headline is one branch (the paper's and the official code's ONE); ONE-E, the gated ensemble, is
    # exported beside it.
    torch.testing.assert_close(method.predict(images).detach(), logits[0])
    assert method.headline() == "branch_0"
    torch.testing.assert_close(method.exported_students()["one_ensemble"](images).detach(), ensemble)


def test_kl_target_is_detached_so_the_gate_learns_only_from_the_ensemble_ce(method, batch):
    images, labels = batch
    gate_params = list(method.network.gate.parameters())
    clock = TrainingClock(epoch=100.0, total_epochs=100)  # ramp-up done: KL at full weight
    method.training_loss(images, labels, None, clock).loss.backward()
    from_loss = [p.grad.clone() for p in gate_params]

    method.zero_grad()
    outputs, gate = method.network.forward_parts(images)
    ensemble = method.network.ensemble_logits(outputs.logits, gate)
    F.cross_entropy(ensemble, labels).backward()
    from_ensemble_ce = [p.grad.clone() for p in gate_params]

    for got, want in zip(from_loss, from_ensemble_ce, strict=True):
        torch.testing.assert_close(got, want)


def test_every_parameter_receives_gradient(method, batch):
    images, labels = batch
    method.training_loss(images, labels, None, TrainingClock(epoch=1.0, total_epochs=20)).loss.backward()
    for name, parameter in method.named_parameters():
        assert parameter.grad is not None, name
        if name not in BN_CANCELLED:
            assert parameter.grad.abs().sum() > 0, name


def test_param_groups_hold_every_parameter_at_lr(method):
    groups = method.param_groups(0.1)
    assert [g["lr"] for g in groups] == [0.1]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in method.parameters()}


def test_exported_students_run_alone(method, batch):
    images, _ = batch
    exported = method.exported_students()
    assert sorted(exported) == ["branch_0", "branch_1", "branch_2", "one_ensemble"]
    for network in exported.values():
        network.eval()
        with torch.no_grad():
            assert network(images).shape == (4, NUM_CLASSES)


def test_external_teachers_are_refused():
    teacher = TeacherInfo(name="resnet56", num_classes=NUM_CLASSES, feature_shapes={})
    with pytest.raises(ValueError, match="uses no external teachers.*resnet56"):
        create_method(ONEParams(depth=8), num_classes=NUM_CLASSES, in_chans=3, teachers=[teacher])


@pytest.mark.parametrize(
    "bad", [{"branches": 1}, {"depth": 9}, {"temperature": 0.0}, {"rampup_epochs": -1.0}, {"gate": "softmax"}]
)
def test_params_reject_bad_values(bad):
    with pytest.raises(ValidationError):
        ONEParams(**bad)


def test_params_defaults_follow_the_paper():
    params = ONEParams()
    assert (params.depth, params.branches, params.temperature, params.rampup_epochs) == (32, 3, 3.0, 80.0)


def test_imagenet_trunk_copies_layer4_per_branch_and_trains_every_parameter():
    torch.manual_seed(0)
    method = build_one(
        ONEParams(trunk="imagenet_resnet", arch="resnet26", branches=2),
        num_classes=4,
        in_chans=3,
        teachers=[],
    )
    unit_bn_scales(method)
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([0, 3])

    method.training_loss(images, labels, None, TrainingClock(epoch=5.0, total_epochs=20)).loss.backward()

    trunk = method.network.trunk
    assert [name for name, _ in trunk.shared.named_children()] == ["layer1", "layer2", "layer3"]
    assert method.network.gate.linear.in_features == 1024  # the gate reads layer3's output
    for name, param in method.named_parameters():
        assert param.grad is not None, name
        if name not in BN_CANCELLED:
            assert param.grad.abs().sum() > 0, name
    method.eval()
    exported = method.exported_students()
    assert list(exported) == ["branch_0", "branch_1", "one_ensemble"]
    with torch.no_grad():
        for network in exported.values():
            assert network(images).shape == (2, 4)
