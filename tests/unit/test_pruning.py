"""L1 filter pruning of ResNet-50 (Li et al., ICLR 2017): the pruned dense network computes what the original
computes with the pruned channels zeroed after their BN and ReLU; parameter counts fall with the ratio."""

from __future__ import annotations

import logging

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.resnet import Bottleneck
from torch import nn

from services.core.errors import ConfigError
from trainer.students import StudentConfig, count_parameters, create_student, l1_kept_filters

NUM_CLASSES = 5
RATIOS = (0.25, 0.375, 0.5)


def test_l1_kept_filters_drop_the_smallest_l1_norms_and_keep_the_order():
    weight = torch.tensor([[3.0, -3.0], [0.5, 0.1], [-4.0, 0.0], [1.0, 1.0]]).view(
        4, 2, 1, 1
    )  # L1: 6, .6, 4, 2
    assert l1_kept_filters(weight, 0.5).tolist() == [0, 2]
    assert l1_kept_filters(weight, 0.25).tolist() == [0, 2, 3]
    assert l1_kept_filters(weight, 0.0).tolist() == [0, 1, 2, 3]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[nn.Module, str]:
    """A ResNet-50 whose every BN channel matters (random statistics and affine parameters; timm's init would
    zero each bottleneck's last BN scale and hide the residual branches), and its safetensors file."""
    torch.manual_seed(0)
    model = timm.create_model("resnet50", num_classes=NUM_CLASSES)
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            channels = module.num_features
            module.weight.data = torch.rand(channels, generator=generator) * 0.5 + 0.25
            module.bias.data = torch.randn(channels, generator=generator) * 0.1
            module.running_mean = torch.randn(channels, generator=generator) * 0.1
            module.running_var = torch.rand(channels, generator=generator) + 0.5
    path = tmp_path_factory.mktemp("weights") / "resnet50.safetensors"
    save_file(model.state_dict(), str(path))
    return model.eval(), str(path)


def zero_channels(kept: torch.Tensor, channels: int):
    """A forward hook that zeroes every channel of a module's output but `kept`."""
    mask = torch.zeros(channels)
    mask[kept] = 1.0

    def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        return output * mask.view(1, -1, 1, 1)

    return hook


@pytest.mark.parametrize("ratio", RATIOS)
def test_pruned_network_equals_the_original_with_pruned_channels_zeroed(source, ratio):
    original, path = source
    pruned = create_student(
        "resnet50_l1_pruned", NUM_CLASSES, prune_ratio=ratio, source_checkpoint=path
    ).eval()
    hooks = []
    for block in (m for m in original.modules() if isinstance(m, Bottleneck)):
        # Li et al.'s greedy ranking: conv2's filters ranked on the input channels conv1 keeps.
        keep1 = l1_kept_filters(block.conv1.weight, ratio)
        keep2 = l1_kept_filters(block.conv2.weight[:, keep1], ratio)
        hooks.append(block.act1.register_forward_hook(zero_channels(keep1, block.conv1.out_channels)))
        hooks.append(block.act2.register_forward_hook(zero_channels(keep2, block.conv2.out_channels)))
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    try:
        with torch.no_grad():
            expected, got = original(images), pruned(images)
    finally:
        for hook in hooks:
            hook.remove()

    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the zeroed channels mattered: without the hooks the original differs
        assert (original(images) - got).abs().max() > 1e-2
    block = pruned.layer1[0]
    assert (block.conv1.out_channels, block.conv2.out_channels, block.conv3.out_channels) == (
        64 - int(64 * ratio),
        64 - int(64 * ratio),
        256,
    )


def test_parameter_counts_fall_with_the_ratio_and_are_logged(caplog, capsys):
    torch.manual_seed(0)
    counts = {0.0: count_parameters(timm.create_model("resnet50"))}
    with caplog.at_level(logging.INFO, logger="trainer.students.pruning"):
        for ratio in RATIOS:
            counts[ratio] = count_parameters(create_student("resnet50_l1_pruned", 1000, prune_ratio=ratio))
    with capsys.disabled():
        print("\nResNet-50 (1000 classes) parameters by L1-pruned fraction of bottleneck filters:")
        for ratio, count in counts.items():
            print(f"  {ratio:6.1%}: {count:,}")
    assert list(counts.values()) == sorted(counts.values(), reverse=True) and len(set(counts.values())) == 4
    assert f"{counts[0.0]:,} -> {counts[0.25]:,} parameters" in caplog.text
    assert "25% of the bottleneck filters pruned by L1 norm from random weights" in caplog.text


def test_the_pruned_network_trains_and_keeps_timms_interface():
    torch.manual_seed(0)
    student = StudentConfig(arch="resnet50_l1_pruned", options={"prune_ratio": 0.5}).build(3, in_chans=3)
    features = student.forward_features(torch.randn(2, 3, 64, 64))
    assert features.shape == (2, student.num_features, 2, 2) and student.num_features == 2048
    student.forward_head(features).sum().backward()
    assert all(p.grad is not None for p in student.parameters())


def test_a_bad_ratio_is_a_config_error():
    with pytest.raises(ConfigError, match="rejected options.*prune_ratio must be in \\[0, 1\\), got 1.0"):
        StudentConfig(arch="resnet50_l1_pruned", options={"prune_ratio": 1.0}).build(3, in_chans=3)


def test_a_source_checkpoint_of_another_network_is_named(tmp_path):
    path = tmp_path / "resnet18.safetensors"
    save_file(timm.create_model("resnet18", num_classes=NUM_CLASSES).state_dict(), str(path))
    config = StudentConfig(arch="resnet50_l1_pruned", options={"source_checkpoint": str(path)})
    with pytest.raises(
        ConfigError, match=f"source_checkpoint '{path}' does not fit student 'resnet50_l1_pruned'"
    ):
        config.build(NUM_CLASSES, in_chans=3)
