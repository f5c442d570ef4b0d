import hashlib
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from services.core.errors import UnknownNameError
from services.teachers.architectures import IMAGENET_RESNET_TAPS
from services.teachers.checkpoints import CHECKPOINT_FORMAT, TeacherCheckpointError, file_sha256
from services.teachers.spec import Preprocessing, Teacher, TeacherSpec
from services.teachers.zoo import TEACHERS, create_teacher, register_teacher, save_teacher_checkpoint

IMAGENET_ENTRIES = ["resnet18", "resnet34", "resnet50", "resnet152"]
CIFAR_ENTRIES = [
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet56",
    "cifar_resnet110",
    "cifar_wrn16_2",
    "cifar_wrn16_4",
    "cifar_wrn28_10",
]
SMALL = Preprocessing(16, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


def randomize_batchnorm(model: nn.Module, seed: int) -> None:
    """Give BN layers non-default statistics so that loading them visibly changes eval outputs."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)


@pytest.fixture
def trained_cifar_resnet20(tmp_path):
    """A cifar_resnet20 with 4 classes, saved with SMALL preprocessing."""
    torch.manual_seed(0)
    teacher = create_teacher("cifar_resnet20", 4)
    randomize_batchnorm(teacher.model, seed=1)
    path = tmp_path / "teacher.pt"
    sha = save_teacher_checkpoint(path, teacher, "cifar_resnet20", 4, SMALL)
    return teacher, path, sha


def assert_checkpoint_error(match: str, path, **kwargs) -> None:
    arch = kwargs.pop("name", "cifar_resnet20")
    with pytest.raises(TeacherCheckpointError, match=match) as info:
        create_teacher(arch, kwargs.pop("num_classes", 4), checkpoint=path)
    assert str(path) in str(info.value)
    assert f"expected architecture {arch!r}" in str(info.value)


def test_list_teachers_names_every_entry():
    assert TEACHERS.names() == sorted(IMAGENET_ENTRIES + ["senet154", "legacy_senet154"] + CIFAR_ENTRIES)


@pytest.mark.parametrize("name", CIFAR_ENTRIES)
def test_cifar_entries_construct_frozen_with_cifar_defaults(name):
    teacher = create_teacher(name, 3)
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    assert teacher.model.fc.out_features == 3
    assert teacher.spec.preprocessing == Preprocessing.cifar()
    # The wide ResNets are pre-activation: their last-stage tap is read after the final BN-ReLU (FT's and
    # FEED's convention), the map their classifier pools.
    last = "final_act" if name.startswith("cifar_wrn") else "layer3"
    assert teacher.spec.taps == {"layer1": "layer1", "layer2": "layer2", "layer3": last}
    assert teacher.spec.weights_sha256 is None and teacher.spec.checkpoint is None


@pytest.mark.parametrize("name", IMAGENET_ENTRIES)
def test_torchvision_entries_construct_with_imagenet_defaults(name):
    teacher = create_teacher(name, 3)
    assert teacher.model.fc.out_features == 3
    assert teacher.spec.preprocessing == Preprocessing.imagenet()
    assert teacher.spec.preprocessing.input_size == 224
    assert list(teacher.spec.taps) == ["layer1", "layer2", "layer3", "layer4"]
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())


def test_senet154_is_timms_with_layer3_layer4_taps():
    teacher = create_teacher("senet154", 3)
    assert teacher.model.default_cfg["architecture"] == "senet154"
    assert teacher.model.get_classifier().out_features == 3
    assert teacher.spec.taps == {"layer3": "layer3", "layer4": "layer4"}
    assert teacher.spec.preprocessing == Preprocessing.imagenet()


def test_small_forwards_give_one_logit_row_per_image():
    with torch.inference_mode():
        assert create_teacher("resnet18", 3).model(torch.rand(2, 3, 32, 32)).shape == (2, 3)
        assert create_teacher("cifar_resnet20", 5).model(torch.rand(2, 3, 16, 16)).shape == (2, 5)


def test_in_chans_comes_from_preprocessing():
    gray = Preprocessing(16, (0.5,), (0.25,), in_chans=1)
    assert create_teacher("cifar_resnet20", 3, preprocessing=gray).model.stem[0].in_channels == 1
    assert create_teacher("cifar_wrn16_2", 3, preprocessing=gray).model.stem.in_channels == 1
    assert create_teacher("resnet18", 3, preprocessing=gray).model.conv1.in_channels == 1


def test_unknown_teacher_lists_available_names():
    with pytest.raises(UnknownNameError, match="unknown teacher 'resnet9000'; available: ") as info:
        create_teacher("resnet9000", 10)
    assert str(info.value).endswith(
        ", ".join(TEACHERS.names()) + "; or timm:<architecture> for any timm model"
    )


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="'resnet18' is already registered"):

        @register_teacher(preprocessing=Preprocessing.imagenet(), taps={})
        def resnet18(num_classes, in_chans):
            return nn.Identity()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_size=0, mean=(0.5,), std=(0.5,), in_chans=1), "input_size must be a positive"),
        (dict(input_size=8, mean=(0.5, 0.5), std=(0.5,), in_chans=1), "one value per channel"),
        (dict(input_size=8, mean=(0.5,), std=(0.0,), in_chans=1), "std values must be positive"),
        (dict(input_size=8, mean=(0.5,), std=(0.5,), in_chans=1, crop_pct=0), "crop_pct must be positive"),
        (
            dict(input_size=8, mean=(0.5,), std=(0.5,), in_chans=1, interpolation="nearest"),
            "interpolation must be one of bilinear, bicubic, got 'nearest'",
        ),
    ],
)
def test_preprocessing_rejects_inconsistent_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Preprocessing(**kwargs)


def test_preprocessing_dict_round_trip_gives_equal_value():
    assert Preprocessing.from_dict(json.loads(json.dumps(SMALL.to_dict()))) == SMALL


def spec(**changes) -> TeacherSpec:
    fields = dict(
        name="cifar_resnet20",
        num_classes=10,
        preprocessing=Preprocessing.cifar(),
        taps={"layer1": "layer1", "layer3": "layer3"},
        weights_sha256="ab" * 32,
        checkpoint="/a.pt",
    )
    return TeacherSpec(**{**fields, **changes})


def test_identity_is_a_sha256_hex_digest_ignoring_checkpoint_path_and_tap_order():
    base = spec()
    assert len(base.identity) == 64 and int(base.identity, 16) >= 0
    assert spec(checkpoint="/elsewhere/copy.pt").identity == base.identity
    assert spec(taps={"layer3": "layer3", "layer1": "layer1"}).identity == base.identity


@pytest.mark.parametrize(
    "changes",
    [
        dict(name="cifar_resnet32"),
        dict(num_classes=100),
        dict(weights_sha256="cd" * 32),
        dict(weights_sha256=None),
        dict(preprocessing=Preprocessing.cifar(input_size=16)),
        dict(preprocessing=Preprocessing(32, (0.5, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))),
        dict(taps={"layer1": "layer1"}),
        dict(taps={"layer1": "layer1", "layer3": "layer3.0"}),
    ],
)
def test_identity_changes_with_anything_that_changes_outputs(changes):
    assert spec(**changes).identity != spec().identity


def test_identity_is_the_same_in_another_process():
    code = (
        "from services.teachers.zoo import Preprocessing, TeacherSpec;"
        "print(TeacherSpec('cifar_resnet20', 10, Preprocessing.cifar(),"
        " {'layer1': 'layer1', 'layer3': 'layer3'}, 'ab' * 32, '/a.pt').identity)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    other = run.stdout.strip()
    assert other == spec().identity


# Computed with services/teachers/zoo.py as it was before Preprocessing carried crop_pct and interpolation:
# existing teachers keep their identities, and so their cached outputs.
@pytest.mark.parametrize(
    "make_spec, identity",
    [
        (spec, "4dc01c2c80d40be960dac7341347f38d363bd5e72c7a4254f0a019e88df496e0"),
        (
            lambda: create_teacher("cifar_resnet20", 10).spec,
            "935e871704cd6e7bc79451109fe2427a5b93fa7a441f2acc389938f16537f26d",
        ),
        (
            lambda: create_teacher("resnet18", 1000).spec,
            "4c966dc4fb2fa21a5a6f63cc6499270d86ae1f1671ab03878cdd2035c35171f6",
        ),
        (
            lambda: TeacherSpec(
                "resnet152",
                1000,
                Preprocessing.from_dict(Preprocessing.imagenet().to_dict()),
                IMAGENET_RESNET_TAPS,
            ),
            "1cba63e64e844217d2e8beeed6100dcd80e1514d0cb53837d28d768e66849219",
        ),
    ],
)
def test_identities_of_existing_teachers_are_pinned(make_spec, identity):
    assert make_spec().identity == identity


def test_non_default_crop_pct_or_interpolation_changes_identity():
    cropped = Preprocessing(32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), crop_pct=0.95)
    bicubic = Preprocessing(32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), interpolation="bicubic")
    identities = {spec().identity, spec(preprocessing=cropped).identity, spec(preprocessing=bicubic).identity}
    assert len(identities) == 3


def test_a_checkpoint_written_before_crop_pct_and_interpolation_reads_their_defaults():
    old = {"input_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "in_chans": 3}
    assert Preprocessing.from_dict(old) == Preprocessing(32, (0.5,) * 3, (0.25,) * 3, 3, 0.875, "bilinear")


def test_spec_to_dict_is_plain_json():
    data = json.loads(json.dumps(spec().to_dict()))
    assert data["preprocessing"] == {
        "input_size": 32,
        "mean": [0.4914, 0.4822, 0.4465],
        "std": [0.247, 0.2435, 0.2616],
        "in_chans": 3,
        "crop_pct": 0.875,
        "interpolation": "bilinear",
    }
    assert data["identity"] == spec().identity and data["taps"]["layer3"] == "layer3"


def test_checkpoint_round_trip_restores_outputs_hash_and_preprocessing(trained_cifar_resnet20):
    original, path, sha = trained_cifar_resnet20
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest() == file_sha256(path)
    restored = create_teacher("cifar_resnet20", 4, checkpoint=path)
    assert restored.spec.weights_sha256 == sha
    assert restored.spec.checkpoint == str(path)
    assert restored.spec.preprocessing == SMALL
    images = torch.rand(2, 3, 16, 16)
    with torch.inference_mode():
        fresh = create_teacher("cifar_resnet20", 4).model(images)
        assert torch.equal(restored.model(images), original.model(images))
        assert not torch.allclose(fresh, original.model(images))


def test_checkpoint_holds_only_plain_data(trained_cifar_resnet20):
    _, path, _ = trained_cifar_resnet20
    content = torch.load(path, map_location="cpu", weights_only=True)
    assert content["format"] == CHECKPOINT_FORMAT
    assert content["architecture"] == "cifar_resnet20" and content["num_classes"] == 4
    assert content["preprocessing"] == SMALL.to_dict()
    assert all(isinstance(v, torch.Tensor) for v in content["state_dict"].values())
    assert not list(path.parent.glob(".*.tmp"))


def test_explicit_preprocessing_overrides_the_checkpoints(trained_cifar_resnet20):
    _, path, _ = trained_cifar_resnet20
    explicit = Preprocessing.cifar(input_size=24)
    teacher = create_teacher("cifar_resnet20", 4, checkpoint=path, preprocessing=explicit)
    assert teacher.spec.preprocessing == explicit


def test_raw_state_dict_file_loads_with_entry_preprocessing(tmp_path, trained_cifar_resnet20):
    original, _, _ = trained_cifar_resnet20
    path = tmp_path / "raw.pth"
    torch.save(original.model.state_dict(), path)
    restored = create_teacher("cifar_resnet20", 4, checkpoint=path)
    assert restored.spec.preprocessing == Preprocessing.cifar()
    assert restored.spec.weights_sha256 == file_sha256(path)
    for key, value in original.model.state_dict().items():
        assert torch.equal(restored.model.state_dict()[key], value)


def test_saving_a_bare_model_uses_the_entry_preprocessing(tmp_path):
    model = create_teacher("cifar_resnet20", 2).model
    save_teacher_checkpoint(tmp_path / "bare.pt", model, "cifar_resnet20", 2)
    assert (
        create_teacher("cifar_resnet20", 2, checkpoint=tmp_path / "bare.pt").spec.preprocessing
        == Preprocessing.cifar()
    )


def test_missing_checkpoint_file(tmp_path):
    assert_checkpoint_error("file not found", tmp_path / "absent.pt")


def test_garbage_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a torch file")
    assert_checkpoint_error("not a readable torch checkpoint", path)


@pytest.mark.parametrize(
    "content, match",
    [
        ([1, 2, 3], "holds a list, not a checkpoint dict"),
        ({"weights": [1.0]}, "neither an ekd.teacher.v1 checkpoint nor a state_dict"),
        ({"format": "ekd.teacher.v0"}, "unsupported format 'ekd.teacher.v0'"),
    ],
)
def test_files_that_are_not_teacher_checkpoints(tmp_path, content, match):
    path = tmp_path / "odd.pt"
    torch.save(content, path)
    assert_checkpoint_error(match, path)


def test_architecture_mismatch(trained_cifar_resnet20):
    _, path, _ = trained_cifar_resnet20
    assert_checkpoint_error(
        "architecture mismatch: checkpoint says 'cifar_resnet20', asked for 'cifar_resnet32'",
        path,
        name="cifar_resnet32",
    )


def test_num_classes_mismatch(trained_cifar_resnet20):
    _, path, _ = trained_cifar_resnet20
    assert_checkpoint_error("num_classes mismatch: checkpoint has 4, asked for 10", path, num_classes=10)


def test_invalid_stored_preprocessing(tmp_path, trained_cifar_resnet20):
    original, _, _ = trained_cifar_resnet20
    path = tmp_path / "bad_pre.pt"
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "architecture": "cifar_resnet20",
            "num_classes": 4,
            "preprocessing": {"input_size": 32},
            "state_dict": original.model.state_dict(),
        },
        path,
    )
    assert_checkpoint_error("invalid preprocessing", path)


def test_state_dict_missing_and_unexpected_keys_are_listed(tmp_path, trained_cifar_resnet20):
    original, _, _ = trained_cifar_resnet20
    state = dict(original.model.state_dict())
    del state["fc.weight"], state["fc.bias"]
    state["head.weight"] = torch.zeros(1)
    path = tmp_path / "keys.pt"
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "architecture": "cifar_resnet20",
            "num_classes": 4,
            "preprocessing": SMALL.to_dict(),
            "state_dict": state,
        },
        path,
    )
    assert_checkpoint_error(r"missing keys fc\.weight, fc\.bias; unexpected keys head\.weight", path)


def test_state_dict_shape_mismatch_is_listed_and_long_lists_are_cut(tmp_path):
    path = tmp_path / "wide.pth"
    torch.save(create_teacher("cifar_wrn16_2", 4).model.state_dict(), path)
    with pytest.raises(TeacherCheckpointError) as info:
        create_teacher("cifar_wrn16_4", 4, checkpoint=path)
    message = str(info.value)
    assert "shape mismatch layer1.0.bn1.weight" not in message  # 16 channels in both: not a mismatch
    assert "layer1.0.conv1.weight: checkpoint [32, 16, 3, 3] vs model [64, 16, 3, 3]" in message
    assert "more)" in message


def test_teacher_dataclass_holds_model_and_spec():
    teacher = create_teacher("cifar_resnet20", 2)
    assert isinstance(teacher, Teacher) and isinstance(teacher.spec, TeacherSpec)
    assert teacher.spec.num_classes == 2 and teacher.spec.name == "cifar_resnet20"


def test_wide_resnet_last_stage_tap_is_after_the_final_bn_relu():
    teacher = create_teacher("cifar_wrn16_2", 3)
    model = teacher.model
    seen = {}
    model.get_submodule(teacher.spec.taps["layer3"]).register_forward_hook(
        lambda module, args, output: seen.setdefault("tap", output)
    )
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        logits = model(images)
        expected = torch.relu(model.bn(model.layer3(model.layer2(model.layer1(model.stem(images))))))
    torch.testing.assert_close(seen["tap"], expected)
    assert (seen["tap"] >= 0).all()
    torch.testing.assert_close(model.fc(seen["tap"].mean((2, 3))), logits)
