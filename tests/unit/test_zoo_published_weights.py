"""Teachers as users have them: published weight files (safetensors, torch state dicts, timm's and
torchvision's key layouts) and any timm model as a teacher (`timm:<name>`).

Every file is real: built from timm's or torchvision's own constructors, written with safetensors or
torch.save into tmp_path, and read back through `create_teacher`.
"""

import argparse
import hashlib
import logging

import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
import torchvision
from pydantic import ValidationError
from timm.models import register_model
from torch import nn

from services.core.errors import ConfigError, UnknownNameError
from services.serve.serve_config import TeacherDeploymentConfig
from services.teachers.checkpoints import TeacherCheckpointError
from services.teachers.engine import TeacherEngine
from services.teachers.spec import Preprocessing
from services.teachers.zoo import check_teacher_name, create_teacher, save_teacher_checkpoint
from trainer.config import TeacherConfig

IMAGES = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
NO_CFG_MODEL = "ekd_test_global_pool_linear"


@register_model
def ekd_test_global_pool_linear(pretrained=False, num_classes=1000, in_chans=3, **pretrained_cfg_kwargs):
    """A timm-registered model with no pretrained config and no feature_info, as a user's own model is."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_chans, num_classes))


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Non-default BN statistics, so that the outputs match only if the buffers loaded too; eval mode."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    return model.eval()


def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_loads_with_identical_outputs(zoo_name: str, path, source: nn.Module, num_classes: int) -> None:
    teacher = create_teacher(zoo_name, num_classes, checkpoint=path)
    assert teacher.spec.weights_sha256 == sha256_of(path)
    with torch.inference_mode():
        assert torch.equal(teacher.model(IMAGES), source(IMAGES))


def save_both_ways(state_dict: dict[str, torch.Tensor], tmp_path) -> list:
    """The two forms weights are published in: timm's safetensors, torchvision's torch.save'd dict."""
    safetensors_path, torch_path = tmp_path / "weights.safetensors", tmp_path / "weights.pth"
    safetensors.torch.save_file(state_dict, safetensors_path)
    torch.save(state_dict, torch_path)
    return [safetensors_path, torch_path]


def assert_checkpoint_error(match: str, name: str, num_classes: int, path) -> str:
    with pytest.raises(TeacherCheckpointError, match=match) as info:
        create_teacher(name, num_classes, checkpoint=path)
    message = str(info.value)
    assert str(path) in message and f"expected architecture {name!r}" in message
    return message


# ---- published key layouts: real round trips -----------------------------------------------------------


@pytest.mark.parametrize(
    "build_source",
    [
        pytest.param(lambda: torchvision.models.resnet152(weights=None, num_classes=10), id="torchvision"),
        pytest.param(lambda: timm.create_model("resnet152", num_classes=10), id="timm"),
    ],
)
def test_resnet152_loads_torchvisions_and_timms_state_dicts(tmp_path, build_source):
    source = randomize_batchnorm(build_source())
    for path in save_both_ways(source.state_dict(), tmp_path):
        assert_loads_with_identical_outputs("resnet152", path, source, 10)


@pytest.mark.slow
@pytest.mark.parametrize("name, other", [("senet154", "legacy_senet154"), ("legacy_senet154", "senet154")])
def test_senet154_layouts_load_timms_state_dicts_and_refuse_each_other(tmp_path, name, other):
    source = randomize_batchnorm(timm.create_model(name, num_classes=10))
    paths = save_both_ways(source.state_dict(), tmp_path)
    for path in paths:
        assert_loads_with_identical_outputs(name, path, source, 10)
    message = assert_checkpoint_error("state_dict does not fit the model: missing keys", other, 10, paths[0])
    assert "unexpected keys" in message


def test_legacy_senet154_entry_is_timms_cadene_layout_with_timms_preprocessing():
    teacher = create_teacher("legacy_senet154", 10)
    assert type(teacher.model).__name__ == "SENet"
    assert "layer0.conv1.weight" in teacher.model.state_dict()
    assert teacher.model.last_linear.out_features == 10
    assert teacher.spec.taps == {"layer3": "layer3", "layer4": "layer4"}
    cfg = timm.models.get_pretrained_cfg("legacy_senet154")
    assert teacher.spec.preprocessing == Preprocessing(
        cfg.input_size[-1], cfg.mean, cfg.std, crop_pct=cfg.crop_pct, interpolation=cfg.interpolation
    )


# ---- file formats and wrappers -------------------------------------------------------------------------


@pytest.fixture
def cifar_source() -> nn.Module:
    torch.manual_seed(2)
    return randomize_batchnorm(create_teacher("cifar_resnet20", 4).model)


def test_safetensors_state_dict_loads_and_its_sha256_is_the_identity(tmp_path, cifar_source):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(cifar_source.state_dict(), path)
    assert_loads_with_identical_outputs("cifar_resnet20", path, cifar_source, 4)
    renamed = tmp_path / "model.bin"  # recognised by its bytes, not its suffix
    renamed.write_bytes(path.read_bytes())
    assert create_teacher("cifar_resnet20", 4, checkpoint=renamed).spec.identity == (
        create_teacher("cifar_resnet20", 4, checkpoint=path).spec.identity
    )
    torch_path = tmp_path / "model.pth"
    torch.save(cifar_source.state_dict(), torch_path)
    assert create_teacher("cifar_resnet20", 4, checkpoint=torch_path).spec.identity != (
        create_teacher("cifar_resnet20", 4, checkpoint=path).spec.identity
    )


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "state_dict_ema"])
def test_nested_and_ddp_prefixed_state_dicts_load(tmp_path, cifar_source, wrapper):
    ddp_keys = {f"module.{key}": value for key, value in cifar_source.state_dict().items()}
    path = tmp_path / "train_checkpoint.pth"
    torch.save({wrapper: ddp_keys, "epoch": 90, "optimizer": {"state": {}, "param_groups": []}}, path)
    assert_loads_with_identical_outputs("cifar_resnet20", path, cifar_source, 4)


def test_ema_weights_are_preferred_like_timm_does(tmp_path, cifar_source):
    raw = create_teacher("cifar_resnet20", 4).model
    path = tmp_path / "ema.pth"
    torch.save({"state_dict": raw.state_dict(), "state_dict_ema": cifar_source.state_dict()}, path)
    assert_loads_with_identical_outputs("cifar_resnet20", path, cifar_source, 4)


def test_weights_without_bn_batch_counters_load_as_torchvisions_first_resnets_are(tmp_path):
    source = randomize_batchnorm(torchvision.models.resnet18(weights=None, num_classes=10))
    old_layout = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(old_layout, path)
    assert_loads_with_identical_outputs("resnet18", path, source, 10)


# ---- mismatches and unreadable files -------------------------------------------------------------------


def test_wrong_class_count_is_named(tmp_path):
    path = tmp_path / "imagenet.safetensors"
    safetensors.torch.save_file(timm.create_model("resnet18", num_classes=1000).state_dict(), path)
    message = assert_checkpoint_error("fc.weight has 1000 classes, asked for 10", "resnet18", 10, path)
    assert "shape mismatch fc.weight: checkpoint [1000, 512] vs model [10, 512]" in message


def test_another_architectures_safetensors_lists_missing_keys(tmp_path):
    path = tmp_path / "resnet18.safetensors"
    safetensors.torch.save_file(torchvision.models.resnet18(weights=None, num_classes=10).state_dict(), path)
    assert_checkpoint_error(r"missing keys layer1\.2\.conv1\.weight", "resnet34", 10, path)


def test_truncated_safetensors_is_not_readable(tmp_path, cifar_source):
    whole = tmp_path / "whole.safetensors"
    safetensors.torch.save_file(cifar_source.state_dict(), whole)
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert_checkpoint_error("not a readable safetensors file", "cifar_resnet20", 4, path)


def test_pickled_python_objects_are_refused_not_run(tmp_path, cifar_source):
    path = tmp_path / "timm_train_checkpoint.pth.tar"
    torch.save({"state_dict": cifar_source.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    assert_checkpoint_error(
        "holds a pickled argparse.Namespace; .* save the state_dict alone, or as safetensors",
        "cifar_resnet20",
        4,
        path,
    )


# ---- timm:<name> teachers ------------------------------------------------------------------------------


def test_timm_teacher_takes_timms_pretrained_preprocessing_and_last_stages():
    teacher = create_teacher("timm:resnet18", 7)
    assert teacher.model.default_cfg["architecture"] == "resnet18"
    assert teacher.model.get_classifier().out_features == 7
    assert teacher.spec.preprocessing == Preprocessing(
        224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), crop_pct=0.95, interpolation="bicubic"
    )
    assert teacher.spec.taps == {"layer3": "layer3", "layer4": "layer4"}
    assert "crop_pct" in teacher.spec.preprocessing.identity_dict()


def test_timm_teacher_pretrained_tag_selects_that_tags_preprocessing():
    preprocessing = create_teacher("timm:resnet18.tv_in1k", 3).spec.preprocessing
    assert (preprocessing.crop_pct, preprocessing.interpolation) == (0.875, "bilinear")


def test_timm_teacher_taps_follow_feature_info_and_are_read_by_the_engine():
    teacher = create_teacher("timm:convnext_atto", 3, preprocessing=Preprocessing.imagenet(64))
    assert teacher.spec.taps == {"stages.2": "stages.2", "stages.3": "stages.3"}
    outputs = TeacherEngine(teacher).infer(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), ["stages.3"])
    assert outputs["stages.3"].shape == (1, 320, 2, 2)


def test_timm_model_without_pretrained_config_gets_imagenet_defaults_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="services.teachers.zoo"):
        teacher = create_teacher(f"timm:{NO_CFG_MODEL}", 5)
    assert teacher.spec.preprocessing == Preprocessing.imagenet()
    assert teacher.spec.taps == {}
    assert f"timm:{NO_CFG_MODEL}" in caplog.text and "using ImageNet preprocessing" in caplog.text


def test_timm_teacher_round_trips_a_timm_safetensors_file_and_ekd_checkpoint(tmp_path):
    source = randomize_batchnorm(timm.create_model("resnet18", num_classes=10))
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(source.state_dict(), path)
    assert_loads_with_identical_outputs("timm:resnet18", path, source, 10)
    ekd_path = tmp_path / "teacher.pt"
    save_teacher_checkpoint(ekd_path, source, "timm:resnet18", 10)
    restored = create_teacher("timm:resnet18", 10, checkpoint=ekd_path)
    assert restored.spec.preprocessing.interpolation == "bicubic"
    assert_loads_with_identical_outputs("timm:resnet18", ekd_path, source, 10)


def test_engine_resizes_with_the_teachers_interpolation():
    bicubic = Preprocessing(32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), interpolation="bicubic")
    teacher = create_teacher("timm:resnet18", 3, preprocessing=bicubic)
    randomize_batchnorm(teacher.model)
    images = torch.randint(
        0, 256, (2, 3, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)
    )
    mean, std = torch.tensor(bicubic.mean).view(1, 3, 1, 1), torch.tensor(bicubic.std).view(1, 3, 1, 1)

    def logits_resized_with(mode: str) -> torch.Tensor:
        x = F.interpolate(images / 255.0, size=(32, 32), mode=mode, align_corners=False, antialias=True)
        with torch.inference_mode():
            return teacher.model((x - mean) / std)

    served = TeacherEngine(teacher).infer(images, ["logits"])["logits"]
    assert torch.allclose(served, logits_resized_with("bicubic"), atol=1e-5)
    assert not torch.allclose(served, logits_resized_with("bilinear"), atol=1e-3)


@pytest.mark.parametrize(
    "name, error, match",
    [
        (
            "timm:resnet18x",
            UnknownNameError,
            r"timm has no architecture 'resnet18x'; close matches: timm:resnet18",
        ),
        ("timm:resnet18.bogus", UnknownNameError, r"Invalid pretrained tag \(bogus\)"),
        ("timm:", UnknownNameError, "timm has no architecture ''"),
        ("resnet9000", UnknownNameError, "available: .*; or timm:<architecture> for any timm model"),
        ("timm:vit_base_patch16_sapiens2", ConfigError, "expects 1024x768 inputs"),
    ],
)
def test_check_teacher_name_refuses_what_cannot_be_built(name, error, match):
    with pytest.raises(error, match=match):
        check_teacher_name(name)


def test_config_validators_accept_timm_teachers_and_name_the_field_otherwise(tmp_path):
    assert check_teacher_name("legacy_senet154") == "legacy_senet154"
    assert TeacherConfig(name="timm:convnext_tiny", checkpoint="t.pt").name == "timm:convnext_tiny"
    served = dict(name="convnext", num_classes=10, checkpoint=str(tmp_path / "c.safetensors"))
    assert (
        TeacherDeploymentConfig(architecture="timm:convnext_tiny", **served).architecture
        == "timm:convnext_tiny"
    )
    with pytest.raises(ValidationError, match="name\n.*timm has no architecture 'convnext_tinyy'"):
        TeacherConfig(name="timm:convnext_tinyy", checkpoint="t.pt")
    with pytest.raises(ValidationError, match="architecture\n.*timm has no architecture 'nope'"):
        TeacherDeploymentConfig(architecture="timm:nope", **served)
