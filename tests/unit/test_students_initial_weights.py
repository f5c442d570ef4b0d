"""`StudentConfig.init_checkpoint`: initial weights from safetensors or weights_only torch files, in timm's
and torchvision's layouts, a classifier over other classes re-initialised, everything else refused by name."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from services.core.errors import ConfigError
from trainer.students import StudentConfig, create_student


def trained_looking(model: nn.Module) -> nn.Module:
    """Random BN statistics and affine parameters, so that a load that skipped them would show."""
    generator = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            channels = module.num_features
            module.weight.data = torch.rand(channels, generator=generator) + 0.5
            module.bias.data = torch.randn(channels, generator=generator) * 0.1
            module.running_mean = torch.randn(channels, generator=generator) * 0.1
            module.running_var = torch.rand(channels, generator=generator) + 0.5
    return model


def source_weights(num_classes: int = 3, arch: str = "timm:resnet18") -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return trained_looking(create_student(arch, num_classes, in_chans=3)).state_dict()


def build(path: Path, num_classes: int = 3, arch: str = "timm:resnet18", in_chans: int = 3) -> nn.Module:
    torch.manual_seed(2)  # another initialisation than the source's
    return StudentConfig(arch=arch, init_checkpoint=str(path)).build(num_classes, in_chans)


def assert_state_equal(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)


def test_round_trip_from_safetensors(tmp_path):
    weights = source_weights()
    path = tmp_path / "resnet18.safetensors"
    save_file(weights, str(path))
    assert_state_equal(build(path), weights)


@pytest.mark.parametrize(
    "layout",
    [
        lambda w: w,
        lambda w: {"state_dict": w, "epoch": 7},
        lambda w: {"model": w, "optimizer": {"lr": 0.1}},
        lambda w: {f"module.{k}": v for k, v in w.items()},
    ],
    ids=["bare", "under_state_dict", "under_model", "ddp_prefixed"],
)
def test_round_trip_from_a_torch_file(tmp_path, layout):
    weights = source_weights()
    path = tmp_path / "resnet18.pt"
    torch.save(layout(weights), path)
    assert_state_equal(build(path), weights)


def test_torchvision_resnet_weights_load_into_the_timm_resnet(tmp_path):
    torch.manual_seed(1)
    reference = trained_looking(torchvision.models.resnet18(num_classes=3)).eval()
    weights = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "resnet18-torchvision.pth"
    torch.save(weights, path)  # as torchvision publishes them: no BN step counters

    student = build(path).eval()

    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(student(images), reference(images))


def test_a_classifier_over_other_classes_is_reinitialised_and_said(tmp_path, caplog):
    weights = source_weights(num_classes=10)
    path = tmp_path / "imagenet-like.safetensors"
    save_file(weights, str(path))
    torch.manual_seed(2)
    fresh_fc = StudentConfig(arch="timm:resnet18").build(3, 3).fc.state_dict()

    with caplog.at_level(logging.INFO, logger="trainer.students.initial_weights"):
        student = build(path)

    assert "classifier 'fc' predicts 10 classes, the student 3: re-initialised" in caplog.text
    assert str(path) in caplog.text
    body = {k: v for k, v in weights.items() if not k.startswith("fc.")}
    assert_state_equal(
        nn.ModuleDict({"m": student}).m, {**body, **{f"fc.{k}": v for k, v in fresh_fc.items()}}
    )


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=f"init_checkpoint '{tmp_path}/absent.pt': no such file"):
        build(tmp_path / "absent.pt")


@pytest.mark.parametrize("name", ["garbage.pt", "garbage.safetensors"])
def test_unreadable_bytes_are_named(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"not weights at all")
    with pytest.raises(ConfigError, match=f"init_checkpoint '{path}': not a readable"):
        build(path)


def test_pickled_objects_are_not_unpickled(tmp_path):
    path = tmp_path / "train-checkpoint.pth"
    torch.save({"state_dict": source_weights(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(ConfigError, match="pickles argparse.Namespace.*weights_only=True"):
        build(path)


def test_a_file_without_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ConfigError, match="holds no state dict"):
        build(path)


def test_another_architecture_names_the_keys(tmp_path):
    path = tmp_path / "resnet34.safetensors"
    save_file(source_weights(arch="timm:resnet34"), str(path))
    with pytest.raises(
        ConfigError,
        match=f"init_checkpoint '{path}' does not fit student 'timm:resnet18': "
        r"unexpected keys: layer1\.2\..* \(\+\d+ more\)$",
    ):
        build(path)


def test_a_shape_mismatch_outside_the_classifier_names_the_key(tmp_path):
    path = tmp_path / "rgb.safetensors"
    save_file(source_weights(), str(path))
    with pytest.raises(
        ConfigError, match=r"shape mismatch: conv1.weight \(file \[64, 3, 7, 7\], student \[64, 1, 7, 7\]\)"
    ):
        build(path, in_chans=1)


def test_missing_keys_are_named(tmp_path):
    weights = source_weights()
    del weights["layer4.1.bn2.running_var"]
    path = tmp_path / "partial.safetensors"
    save_file(weights, str(path))
    with pytest.raises(ConfigError, match="missing keys: layer4.1.bn2.running_var"):
        build(path)


def test_ekds_own_students_take_initial_weights_too(tmp_path):
    torch.manual_seed(1)
    weights = trained_looking(create_student("cifar_resnet8", 10)).state_dict()
    path = tmp_path / "cifar_resnet8.pt"
    torch.save(weights, path)
    assert_state_equal(build(path, num_classes=10, arch="cifar_resnet8"), weights)
