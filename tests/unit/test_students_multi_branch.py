"""The ImageNet multi-branch trunk (timm ResNets): what it shares, the widths of its branch copies, and the
trunk choice in a method's params."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from trainer.students import ImageNetMultiBranchResNet, MultiBranchResNet, MultiBranchTrunkParams


def test_bottleneck_trunk_shares_stem_and_early_stages_and_copies_the_rest_at_truncated_widths():
    torch.manual_seed(0)
    trunk = ImageNetMultiBranchResNet("resnet26", 4, branch_widths=[1.0, 0.6], shared_stages=1)  # bottlenecks
    images = torch.randn(2, 3, 64, 64)

    out = trunk.forward_branches(images)

    assert list(trunk.stem) == [trunk.stem.conv1, trunk.stem.bn1, trunk.stem.act1, trunk.stem.maxpool]
    assert [name for name, _ in trunk.shared.named_children()] == ["layer1"]
    assert trunk.shared_channels == 256 and out.shared.shape == (2, 256, 16, 16)
    # int() truncates as BOC-KD does: 128·0.6 = 76.8 -> 76 planes, 4x in a bottleneck's output
    assert trunk.branch_stage_channels == [[512, 1024, 2048], [76 * 4, 153 * 4, 307 * 4]]
    for channels, features in zip(trunk.branch_stage_channels, out.stage_features):
        assert [f.shape for f in features] == [(2, c, s, s) for c, s in zip(channels, (8, 4, 2))]
    assert [z.shape for z in out.logits] == [(2, 4), (2, 4)]
    torch.testing.assert_close(trunk(images), (out.logits[0] + out.logits[1]) / 2)


def test_basic_block_trunk_copies_only_the_last_stage_by_default():
    trunk = ImageNetMultiBranchResNet("resnet18", 3, branch_widths=[1.0, 0.5])
    assert [name for name, _ in trunk.shared.named_children()] == ["layer1", "layer2", "layer3"]
    assert trunk.shared_channels == 256
    assert trunk.branch_stage_channels == [[512], [256]]
    assert [branch.fc.in_features for branch in trunk.branches] == [512, 256]


def test_an_exported_branch_runs_alone_and_computes_its_branch():
    torch.manual_seed(0)
    trunk = ImageNetMultiBranchResNet("resnet18", 3, branch_widths=[1.0, 0.5]).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        branch_logits = trunk.forward_branches(images).logits
        for index in range(2):
            torch.testing.assert_close(trunk.export_branch(index)(images), branch_logits[index])


@pytest.mark.parametrize("shared_stages", [-1, 4])
def test_shared_stages_leave_a_stage_per_branch(shared_stages):
    with pytest.raises(ValueError, match="shared_stages must be 0, 1, 2 or 3"):
        ImageNetMultiBranchResNet("resnet18", 3, branch_widths=[1.0], shared_stages=shared_stages)


def test_trunk_params_default_to_the_cifar_trunk():
    params = MultiBranchTrunkParams()
    assert (params.trunk, params.depth, params.arch) == ("cifar_resnet", 20, None)
    assert MultiBranchTrunkParams(trunk="imagenet_resnet").arch == "resnet50"
    trunk = params.build_trunk(num_classes=3, in_chans=3, branch_widths=[1.0, 1.0], shared_stages=2)
    assert isinstance(trunk, MultiBranchResNet)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"arch": "resnet18"}, "arch does not apply to trunk 'cifar_resnet', which is sized by depth"),
        ({"trunk": "imagenet_resnet", "depth": 8}, "depth does not apply to trunk 'imagenet_resnet'"),
        (
            {"trunk": "imagenet_resnet", "arch": "resnet05"},
            "not a timm ResNet architecture; close matches: resnet50",
        ),
        ({"trunk": "imagenet_resnet", "arch": "mobilenetv3_large_100"}, "not a timm ResNet architecture"),
        ({"trunk": "densenet"}, "Input should be 'cifar_resnet' or 'imagenet_resnet'"),
    ],
)
def test_trunk_params_reject_fields_of_the_other_trunk_and_unknown_archs(fields, message):
    with pytest.raises(ValidationError, match=message):
        MultiBranchTrunkParams(**fields)
