"""FEED (Park & Kwak, ECAI 2020): loss values, gradients, stages, options and builder errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from method_support import unit_bn_scales
from pydantic import ValidationError

from services.core.errors import ConfigError
from trainer.methods.base import TeacherInfo, TeacherOutputs, TrainingClock
from trainer.methods.feed import FeedParams, build_feed, normalized_l1
from trainer.methods.losses import distillation_kl, soft_targets
from trainer.students import StudentConfig, count_parameters

NUM_CLASSES = 10
CLOCK = TrainingClock(epoch=0.0, total_epochs=1)
TEACHERS = [
    TeacherInfo("wide", NUM_CLASSES, {"layer3": (64, 4, 4), "layer2": (32, 8, 8)}),
    TeacherInfo("narrow", NUM_CLASSES, {"layer3": (32, 2, 2)}),
]


def make_feed(teachers=TEACHERS, **params):
    torch.manual_seed(0)
    return build_feed(FeedParams(**params), num_classes=NUM_CLASSES, in_chans=3, teachers=teachers)


def make_batch(teachers=TEACHERS, requires_grad: bool = False):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 16, 16, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (4,), generator=generator)
    maps = [{"layer3": torch.rand(4, *t.feature_shapes["layer3"], generator=generator)} for t in teachers]
    for out in maps:
        out["layer3"].requires_grad_(requires_grad)
    logits = [torch.randn(4, NUM_CLASSES, generator=generator) for _ in teachers]
    return images, labels, TeacherOutputs(logits=logits, features=maps)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1)
    return flat / flat.norm(dim=1, keepdim=True)


def aligned(student_factor: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(student_factor, teacher_map.shape[-2:])


def test_normalized_l1_by_hand():
    # sample 1: n([1,1,1,1]) = [.5,.5,.5,.5] vs n([1,0,0,0]) = [1,0,0,0]: |diffs| sum to 2.0
    # sample 2: n([3,4,0,0]) = [.6,.8,0,0] vs n([0,0,3,4]) = [0,0,.6,.8]: |diffs| sum to 2.8
    student = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 4.0, 0.0, 0.0]]).view(2, 1, 2, 2)
    teacher = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 3.0, 4.0]]).view(2, 1, 2, 2)
    assert normalized_l1(student, teacher).item() == pytest.approx((2.0 + 2.8) / 8)


def test_normalized_l1_treats_teacher_as_target():
    student = torch.rand(2, 1, 2, 2, requires_grad=True)
    teacher = torch.rand(2, 1, 2, 2, requires_grad=True)
    normalized_l1(student, teacher).backward()
    assert student.grad is not None and teacher.grad is None


def test_parallel_loss_equals_ce_plus_beta_times_summed_factor_losses():
    feed = make_feed()
    images, labels, teachers = make_batch()
    result = feed.training_loss(images, labels, teachers, CLOCK)

    features = feed.student.forward_features(images)
    ce = F.cross_entropy(feed.student.forward_head(features), labels)
    factor = sum(
        (unit_rows(aligned(t(features), out["layer3"])) - unit_rows(out["layer3"])).abs().mean()
        for t, out in zip(feed.transforms, teachers.features)
    )
    expected = ce + 500.0 * factor
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert result.terms["ce"] == pytest.approx(ce.item(), rel=1e-5)
    assert result.terms["factor"] == pytest.approx(factor.item(), rel=1e-5)
    assert set(result.terms) == {"ce", "factor", "factor/wide", "factor/narrow"}


def test_transforms_follow_ft_translator_layout():
    feed = make_feed()
    for transform, channels in zip(feed.transforms, (64, 32)):
        convs = [m for m in transform if isinstance(m, torch.nn.Conv2d)]
        assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
            (64, 64, (3, 3)),
            (64, channels, (3, 3)),
            (channels, channels, (3, 3)),
        ]
        slopes = [m.negative_slope for m in transform if isinstance(m, torch.nn.LeakyReLU)]
        assert slopes == [0.1, 0.1, 0.1]
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in transform.modules())


def test_parallel_gradients_reach_student_and_every_transform_but_not_teacher_maps():
    feed = make_feed()
    images, labels, teachers = make_batch(requires_grad=True)
    feed.training_loss(images, labels, teachers, CLOCK).loss.backward()
    for name, p in list(feed.student.named_parameters()) + list(feed.transforms.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(out["layer3"].grad is None for out in teachers.features)


def test_sequential_stage_trains_only_its_transform():
    feed = make_feed(mode="sequential")
    feed.set_stage(1)
    images, labels, teachers = make_batch(requires_grad=True)
    teachers.features[0] = {}  # teacher 0 is not asked in stage 1
    feed.training_loss(images, labels, teachers, CLOCK).loss.backward()
    for name, p in list(feed.student.named_parameters()) + list(feed.transforms[1].named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in feed.transforms[0].parameters())
    assert teachers.features[1]["layer3"].grad is None


def test_sequential_param_groups_hold_student_and_current_transform_only():
    feed = make_feed(mode="sequential")
    student_ids = {id(p) for p in feed.student.parameters()}
    for stage in range(2):
        feed.set_stage(stage)
        (group,) = feed.param_groups(0.1)
        assert group["lr"] == 0.1
        transform_ids = {id(p) for p in feed.transforms[stage].parameters()}
        assert {id(p) for p in group["params"]} == student_ids | transform_ids
        other = feed.transforms[1 - stage]
        assert not any(p.requires_grad for p in other.parameters())


def test_sequential_stages_continue_the_same_student():
    feed = make_feed(mode="sequential")
    student = feed.student
    with torch.no_grad():
        next(student.parameters()).add_(1.0)
    before = next(student.parameters()).clone()
    feed.set_stage(1)
    assert feed.student is student and torch.equal(next(feed.student.parameters()), before)


def test_parallel_param_groups_hold_everything():
    feed = make_feed()
    (group,) = feed.param_groups(0.05)
    assert {id(p) for p in group["params"]} == {id(p) for p in feed.parameters()}


def test_teacher_outputs_per_mode_and_stage():
    assert make_feed().num_stages == 1
    assert make_feed().teacher_outputs() == [["layer3"], ["layer3"]]
    sequential = make_feed(mode="sequential")
    assert sequential.num_stages == 2
    assert sequential.teacher_outputs() == [["layer3"], []]
    sequential.set_stage(1)
    assert sequential.teacher_outputs() == [[], ["layer3"]]
    assert make_feed(kd_weight=0.5).teacher_outputs() == [["layer3", "logits"], ["layer3", "logits"]]


@pytest.mark.parametrize(("mode", "stage"), [("parallel", 1), ("sequential", 2), ("sequential", -1)])
def test_set_stage_out_of_range(mode, stage):
    with pytest.raises(ValueError, match=f"stage {stage}"):
        make_feed(mode=mode).set_stage(stage)


def test_teacher_map_smaller_than_student_map_is_pooled():
    teachers = [TeacherInfo("narrow", NUM_CLASSES, {"layer3": (32, 2, 2)})]
    feed = make_feed(teachers=teachers)
    images, labels, outputs = make_batch(teachers)
    features = feed.student.forward_features(images)
    assert features.shape[-2:] == (4, 4)
    result = feed.training_loss(images, labels, outputs, CLOCK)
    pooled = aligned(feed.transforms[0](features), outputs.features[0]["layer3"])
    assert pooled.shape == (4, 32, 2, 2)
    expected = normalized_l1(pooled, outputs.features[0]["layer3"])
    assert result.terms["factor"] == pytest.approx(expected.item(), rel=1e-5)


def test_kd_option_adds_weighted_distillation_term():
    feed = make_feed(kd_weight=0.5, temperature=2.0)
    images, labels, teachers = make_batch()
    result = feed.training_loss(images, labels, teachers, CLOCK)
    logits = feed.student.forward_head(feed.student.forward_features(images))
    kd = distillation_kl(logits, soft_targets(teachers.logits, 2.0), 2.0)
    assert result.terms["kd"] == pytest.approx(kd.item(), rel=1e-5)
    total = (result.terms["ce"] + 500.0 * result.terms["factor"] + 0.5 * result.terms["kd"]).item()
    assert result.loss.item() == pytest.approx(total, rel=1e-5)


def test_paraphraser_option_matches_factors_and_adds_reconstruction():
    feed = make_feed(paraphraser=True)
    images, labels, teachers = make_batch()
    result = feed.training_loss(images, labels, teachers, CLOCK)

    features = feed.student.forward_features(images)
    expected = F.cross_entropy(feed.student.forward_head(features), labels)
    for transform, paraphraser, out in zip(feed.transforms, feed.paraphrasers, teachers.features):
        factor = paraphraser.encoder(out["layer3"])
        assert factor.shape[1] == out["layer3"].shape[1] // 2  # FT's rate k = 0.5
        reconstruction = F.l1_loss(paraphraser.decoder(factor), out["layer3"])
        student_factor = aligned(transform(features), factor)
        factor_loss = (unit_rows(student_factor) - unit_rows(factor)).abs().mean()
        expected = expected + reconstruction + 500.0 * factor_loss
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert {"reconstruction/wide", "reconstruction/narrow"} <= set(result.terms)


def paraphraser_grads(beta: float) -> list[torch.Tensor]:
    feed = make_feed(paraphraser=True, beta=beta)
    images, labels, teachers = make_batch()
    feed.training_loss(images, labels, teachers, CLOCK).loss.backward()
    for name, p in feed.paraphrasers.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    return [p.grad for p in feed.paraphrasers.parameters()]


def test_paraphraser_learns_only_from_its_reconstruction():
    # The factor is a detached target: the factor term's weight must not change the paraphraser's gradient.
    for with_factor, without_factor in zip(paraphraser_grads(500.0), paraphraser_grads(0.0)):
        assert torch.allclose(with_factor, without_factor)


def test_sequential_param_groups_hold_current_paraphraser_only():
    sequential = make_feed(mode="sequential", paraphraser=True)
    (group,) = sequential.param_groups(0.1)
    in_group = {id(p) for p in group["params"]}
    assert {id(p) for p in sequential.paraphrasers[0].parameters()} <= in_group
    assert not {id(p) for p in sequential.paraphrasers[1].parameters()} & in_group


@pytest.mark.parametrize("paraphraser", [False, True])
def test_exported_student_is_bare(paraphraser):
    feed = make_feed(paraphraser=paraphraser)
    exported = feed.exported_students()
    assert list(exported) == ["student"]
    bare = StudentConfig().build(NUM_CLASSES, 3)
    assert count_parameters(exported["student"]) == count_parameters(bare)
    assert count_parameters(feed) > count_parameters(bare)


def test_predict_is_the_student():
    feed = make_feed().eval()
    images = make_batch()[0]
    with torch.no_grad():
        assert torch.equal(feed.predict(images), feed.student(images))
    assert feed.predict(images).shape == (4, NUM_CLASSES)


def test_builder_rejects_missing_tap():
    with pytest.raises(ValueError, match=r"'layer9'.*'narrow'; available: layer3"):
        make_feed(teacher_tap="layer9", teachers=[TEACHERS[1]])
    with pytest.raises(ValueError, match="'layer2' is not a feature map of teacher 'narrow'"):
        make_feed(teacher_tap="layer2")


def test_builder_rejects_teachers_without_feature_maps():
    with pytest.raises(ValueError, match="teacher 'logits_only' exposes none"):
        make_feed(teachers=[TeacherInfo("logits_only", NUM_CLASSES, {})])


def test_builder_rejects_zero_teachers():
    with pytest.raises(ValueError, match="at least one teacher"):
        make_feed(teachers=[])


def test_builder_rejects_student_without_feature_interface():
    lacks = "'multi_branch_resnet' lacks forward_features, forward_head, num_features"
    with pytest.raises(ValueError, match=lacks):
        make_feed(student={"arch": "multi_branch_resnet", "options": {"depth": 8}})


def test_builder_rejects_kd_with_mismatched_classes():
    with pytest.raises(ValueError, match="teacher 'hundred' has 100"):
        make_feed(kd_weight=1.0, teachers=[TeacherInfo("hundred", 100, {"layer3": (64, 4, 4)})])


def test_missing_teacher_map_in_batch_is_a_clear_error():
    feed = make_feed()
    images, labels, teachers = make_batch()
    teachers.features[1] = {}
    with pytest.raises(ValueError, match="teacher 'narrow''s feature map 'layer3'"):
        feed.training_loss(images, labels, teachers, CLOCK)
    with pytest.raises(ValueError, match="needs teacher feature maps"):
        feed.training_loss(images, labels, None, CLOCK)


def test_params_defaults_and_bounds():
    params = FeedParams()
    assert (params.mode, params.teacher_tap, params.beta, params.kd_weight, params.temperature) == (
        "parallel",
        "layer3",
        500.0,
        0.0,
        4.0,
    )
    assert params.student.arch == "cifar_resnet8" and params.paraphraser is False
    for bad in ({"beta": -1.0}, {"temperature": 0.0}, {"mode": "cyclic"}, {"unknown": 1}):
        with pytest.raises(ValidationError):
            FeedParams(**bad)


def test_a_timm_student_trains_with_feed_and_deploys_alone():
    feed = make_feed(student=StudentConfig(arch="timm:resnet18"), kd_weight=1.0)
    unit_bn_scales(feed)
    _, labels, teachers = make_batch()
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))

    result = feed.training_loss(images, labels, teachers, CLOCK)
    result.loss.backward()

    assert [t[0].in_channels for t in feed.transforms] == [512, 512]  # resnet18's layer4 map
    assert set(result.terms) == {"ce", "factor", "factor/wide", "factor/narrow", "kd"}
    for name, parameter in feed.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    student = feed.exported_students()["student"].eval()
    with torch.no_grad():
        assert student(images).shape == (4, NUM_CLASSES)


def test_a_student_without_a_feature_map_is_a_config_error():
    feed = make_feed(student=StudentConfig(arch="timm:test_vit", options={"img_size": 64}))
    images, labels, teachers = make_batch()
    with pytest.raises(ConfigError, match=r"forward_features returns shape \[4, \d+, 64\]"):
        feed.training_loss(F.interpolate(images, size=64), labels, teachers, CLOCK)
