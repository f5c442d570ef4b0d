"""Students from timm (`timm:<name>`): they build with in_chans and num_classes, train, and their names are
checked against timm's model list."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from services.core.errors import ConfigError, UnknownNameError
from trainer.students import StudentConfig, create_student


@pytest.mark.parametrize("arch", ["timm:resnet18", "timm:mobilenetv3_small_050"])
def test_a_timm_student_builds_for_in_chans_and_num_classes_and_trains_a_step(arch):
    torch.manual_seed(0)
    student = StudentConfig(arch=arch).build(num_classes=3, in_chans=1)
    images, labels = torch.randn(2, 1, 64, 64), torch.tensor([0, 2])
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05)

    logits = student(images)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    optimizer.step()

    assert logits.shape == (2, 3)
    assert (
        F.cross_entropy(student(images), labels) < loss
    )  # train-mode BN: the same batch, the same statistics


def test_timm_options_pass_through():
    student = create_student("timm:resnet18", 4, in_chans=3, drop_rate=0.25)
    assert student.drop_rate == 0.25


def test_an_unknown_timm_name_lists_close_matches():
    with pytest.raises(
        ValidationError, match="unknown timm architecture 'resnet05'.*close matches: timm:resnet50"
    ):
        StudentConfig(arch="timm:resnet05")


def test_a_timm_name_without_close_matches_says_how_to_list_them():
    with pytest.raises(UnknownNameError, match="timm.list_models"):
        create_student("timm:qqqqzzzz", 3)


def test_an_unknown_registered_name_points_at_timm_too():
    with pytest.raises(
        UnknownNameError, match="available: .*cifar_resnet8.*or any timm architecture as 'timm:<name>'"
    ):
        create_student("resnet_nonexistent", 3)


@pytest.mark.parametrize("option", ["pretrained", "checkpoint_path"])
def test_timm_weight_loading_options_are_refused(option):
    config = StudentConfig(arch="timm:resnet18", options={option: True})
    with pytest.raises(ConfigError, match=f"option {option} is not supported.*init_checkpoint"):
        config.build(num_classes=3, in_chans=3)


def test_an_option_timm_does_not_take_is_a_config_error():
    with pytest.raises(ConfigError, match="student 'timm:resnet18' rejected options"):
        StudentConfig(arch="timm:resnet18", options={"no_such_option": 1}).build(num_classes=3, in_chans=3)
