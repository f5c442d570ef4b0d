import pytest
import torch
import torch.nn.functional as F
from method_support import unit_bn_scales
from pydantic import ValidationError

from trainer.methods import create_method
from trainer.methods.base import TeacherInfo, TrainingClock
from trainer.methods.okd import OKDParams, OnlineEnsembleCompression, build_okd, student_widths
from trainer.students import count_parameters

NUM_CLASSES = 10
CLOCK = TrainingClock(epoch=1.0, total_epochs=10)


def make_method(**overrides) -> OnlineEnsembleCompression:
    torch.manual_seed(0)
    return build_okd(OKDParams(depth=8, **overrides), num_classes=NUM_CLASSES, in_chans=3, teachers=[])


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 16, 16, generator=generator), torch.tensor([0, 3, 7, 3])


def test_student_widths_shrink_by_one_nth():
    assert student_widths(5) == [1.0, 0.8, 0.6, 0.4, 0.2]
    assert student_widths(2) == [1.0, 0.5]


def test_training_loss_matches_the_paper_equation_by_hand(batch):
    images, labels = batch
    method = make_method()
    with torch.no_grad():  # train-mode BN uses batch statistics, so a second forward gives the same values
        outputs = method.network.forward_branches(images)
        adapted = [
            [method.adaptation[j - 1][s](outputs.stage_features[j][s]) for s in range(3)] for j in range(1, 5)
        ]
    logits = outputs.logits
    temperature = 2.0
    target = F.softmax(sum(logits) / 5 / temperature, dim=1)
    ce = sum(F.cross_entropy(z, labels) for z in logits)
    inter = sum(
        ((adapted[j - 1][s] - outputs.stage_features[0][s]) ** 2).mean()
        for j in range(1, 5)
        for s in range(3)
    )
    kl = sum((target * (target.log() - F.log_softmax(z / temperature, dim=1))).sum(1).mean() for z in logits)
    expected = 0.7 * ce + 0.15 * inter + 0.15 * temperature**2 * kl

    result = method.training_loss(images, labels, None, CLOCK)

    torch.testing.assert_close(result.loss.detach(), expected)
    assert result.terms["inter"] == pytest.approx(inter.item(), rel=1e-5)
    torch.testing.assert_close(method.predict(images).detach(), sum(logits) / 5)


def test_ensemble_target_is_detached(batch):
    images, labels = batch
    method = make_method(alpha=0.0, beta=0.0, gamma=1.0)  # the KL term alone
    method.training_loss(images, labels, None, CLOCK).loss.backward()
    got = {name: p.grad.clone() for name, p in method.network.named_parameters()}

    def kl_grads(detach_target: bool) -> dict[str, torch.Tensor]:
        method.zero_grad()
        logits = method.network.forward_branches(images).logits
        ensemble = torch.stack(logits).mean(0)
        target = F.softmax((ensemble.detach() if detach_target else ensemble) / 2.0, dim=1)
        kl = sum(F.kl_div(F.log_softmax(z / 2.0, dim=1), target, reduction="batchmean") for z in logits)
        (4.0 * kl).backward()
        return {name: p.grad.clone() for name, p in method.network.named_parameters()}

    detached, attached = kl_grads(True), kl_grads(False)
    for name, grad in got.items():
        torch.testing.assert_close(grad, detached[name], msg=name)
    assert any(not torch.allclose(grad, attached[name]) for name, grad in got.items())


def test_pseudo_teacher_maps_are_detached_in_the_intermediate_loss(batch):
    images, labels = batch
    method = make_method(alpha=0.0, beta=1.0, gamma=0.0)  # L_inter alone
    method.training_loss(images, labels, None, CLOCK).loss.backward()
    pseudo_teacher = method.network.branches[0]
    assert all(p.grad is None or not p.grad.any() for p in pseudo_teacher.parameters())
    assert all(p.grad is not None and p.grad.any() for p in method.network.branches[4].stages.parameters())


def test_every_parameter_receives_gradient(batch):
    images, labels = batch
    method = make_method()
    method.training_loss(images, labels, None, CLOCK).loss.backward()
    for name, parameter in method.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_adaptation_layers_map_to_the_pseudo_teacher_channels():
    method = make_method()
    assert [[conv.in_channels for conv in stages] for stages in method.adaptation] == [
        [12, 25, 51],
        [9, 19, 38],
        [6, 12, 25],
        [3, 6, 12],
    ]
    assert all([conv.out_channels for conv in stages] == [16, 32, 64] for stages in method.adaptation)


def test_param_groups_put_adaptation_layers_at_half_lr():
    method = make_method()
    main, adaptation = method.param_groups(0.1)
    assert main["lr"] == 0.1 and adaptation["lr"] == pytest.approx(0.05)
    main_ids, adaptation_ids = {id(p) for p in main["params"]}, {id(p) for p in adaptation["params"]}
    assert adaptation_ids == {id(p) for p in method.adaptation.parameters()}
    assert not main_ids & adaptation_ids
    assert main_ids | adaptation_ids == {id(p) for p in method.parameters()}


def test_exported_students_run_alone_and_shrink(batch):
    images, _ = batch
    method = make_method()
    exported = method.exported_students()
    assert list(exported) == [
        "ensemble_mean",
        "student_w1.0",
        "student_w0.8",
        "student_w0.6",
        "student_w0.4",
        "student_w0.2",
    ]
    assert method.headline() == "ensemble_mean" and exported.pop("ensemble_mean") is method.network
    sizes = [count_parameters(network) for network in exported.values()]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 5
    for network in exported.values():
        network.eval()
        with torch.no_grad():
            assert network(images).shape == (4, NUM_CLASSES)


def test_external_teachers_are_refused():
    teacher = TeacherInfo(name="resnet56", num_classes=NUM_CLASSES, feature_shapes={})
    with pytest.raises(ValueError, match="uses no external teachers.*resnet56"):
        create_method(OKDParams(depth=8), num_classes=NUM_CLASSES, in_chans=3, teachers=[teacher])


@pytest.mark.parametrize(
    "bad",
    [
        {"num_students": 1},
        {"depth": 10},
        {"alpha": -0.1},
        {"temperature": 0.0},
        {"adaptation_lr_scale": 0.0},
        {"students": 5},
    ],
)
def test_params_reject_bad_values(bad):
    with pytest.raises(ValidationError):
        OKDParams(**bad)


def test_params_defaults_follow_the_paper():
    params = OKDParams()
    assert (
        params.depth,
        params.num_students,
        params.alpha,
        params.beta,
        params.gamma,
        params.temperature,
        params.adaptation_lr_scale,
    ) == (20, 5, 0.7, 0.15, 0.15, 2.0, 0.5)


def test_imagenet_trunk_shares_stem_and_layer1_and_trains_every_parameter():
    torch.manual_seed(0)
    method = build_okd(
        OKDParams(trunk="imagenet_resnet", arch="resnet26", num_students=3),
        num_classes=4,
        in_chans=3,
        teachers=[],
    )
    unit_bn_scales(method)
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([0, 3])

    method.training_loss(images, labels, None, CLOCK).loss.backward()

    assert [name for name, _ in method.network.shared.named_children()] == ["layer1"]
    # resnet26: ResNet-50's bottleneck stages, 2 blocks each. layer2..4 per student at int(planes x width)
    # planes (BOC-KD truncates); a bottleneck outputs 4x planes.
    assert method.network.branch_stage_channels == [[512, 1024, 2048], [340, 680, 1364], [168, 340, 680]]
    assert [[conv.in_channels for conv in stages] for stages in method.adaptation] == [
        [340, 680, 1364],
        [168, 340, 680],
    ]
    assert all([conv.out_channels for conv in stages] == [512, 1024, 2048] for stages in method.adaptation)
    for name, parameter in method.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    exported = method.exported_students()
    assert list(exported) == ["ensemble_mean", "student_w1.0", "student_w0.67", "student_w0.33"]
    del exported["ensemble_mean"]
    sizes = [count_parameters(network) for network in exported.values()]
    assert sizes == sorted(sizes, reverse=True)
    with torch.no_grad():
        for network in exported.values():
            assert network.eval()(images).shape == (2, 4)


def test_channel_counts_are_truncated_as_the_official_code_counts_them():
    # BOC-KD's 0.2-wide ResNet-110 student on CIFAR-100: its BaseNet (conv1+BN, 16 channels) and stages of
    # int(16·0.2), int(32·0.2), int(64·0.2) = 3, 6, 12 channels: 64,233 parameters.
    method = build_okd(OKDParams(depth=110), num_classes=100, in_chans=3, teachers=[])
    assert count_parameters(method.exported_students()["student_w0.2"]) == 64_233


def test_alone_networks_are_the_exported_students_as_single_networks():
    method = make_method()
    exported = method.exported_students()
    alone = method.alone_networks()
    assert set(alone) == set(exported) - {"ensemble_mean"}
    for name, config in alone.items():
        network = config.build(NUM_CLASSES, 3)
        assert count_parameters(network) == count_parameters(exported[name])
        # the same layers: the export's state dict loads into the baseline network
        assert [tuple(v.shape) for v in network.state_dict().values()] == [
            tuple(v.shape) for v in exported[name].state_dict().values()
        ]


def test_official_code_recipe_trains_the_ensemble_ce_and_leaves_adaptation_out(batch):
    images, labels = batch
    method = make_method(recipe="official_code")
    outputs = method.network.forward_branches(images)
    ensemble = torch.stack(outputs.logits).mean(0)
    target = F.softmax(ensemble.detach() / 2.0, dim=1)
    kl = sum(
        4.0 * F.kl_div(F.log_softmax(z / 2.0, dim=1), target, reduction="batchmean") for z in outputs.logits
    )
    inter = method.intermediate_loss(outputs.stage_features, detach_teacher=False)
    expected = 0.7 * F.cross_entropy(ensemble, labels) + 0.15 * inter + 0.15 * kl
    assert method.training_loss(images, labels, None, CLOCK).loss.item() == pytest.approx(expected.item())
    (group,) = method.param_groups(0.1)
    assert not {id(p) for p in group["params"]} & {id(p) for p in method.adaptation.parameters()}
