import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from services.teachers.engine import InputSpecError, TeacherEngine, UnknownOutputError
from services.teachers.spec import Preprocessing
from services.teachers.zoo import create_teacher

PRE = Preprocessing(16, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


def randomize_batchnorm(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0.0, 0.1)
            module.running_var.uniform_(0.5, 1.5)


@pytest.fixture(scope="module")
def teacher_and_reference():
    """A cifar_resnet20 expecting 16x16 inputs, and a hook-free copy of it for reference forwards."""
    torch.manual_seed(0)
    teacher = create_teacher("cifar_resnet20", 5, preprocessing=PRE)
    randomize_batchnorm(teacher.model)
    return teacher, copy.deepcopy(teacher.model)


@pytest.fixture(scope="module")
def engine(teacher_and_reference):
    return TeacherEngine(teacher_and_reference[0])


@pytest.fixture(scope="module")
def reference(teacher_and_reference):
    return teacher_and_reference[1]


def images(batch: int = 3, size: int = 16, channels: int = 3) -> torch.Tensor:
    return torch.randint(
        0,
        256,
        (batch, channels, size, size),
        dtype=torch.uint8,
        generator=torch.Generator().manual_seed(size),
    )


def reference_input(batch: torch.Tensor) -> torch.Tensor:
    """The teacher's preprocessing written out: [0, 1], bilinear resize to 16x16, per-channel normalise."""
    x = batch.float() / 255.0
    if x.shape[-1] != 16:
        x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.inference_mode()
def reference_stages(model: nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    layer1 = model.layer1(model.stem(reference_input(batch)))
    layer2 = model.layer2(layer1)
    layer3 = model.layer3(layer2)
    logits = model.fc(torch.flatten(model.pool(layer3), 1))
    return {"logits": logits, "layer1": layer1, "layer2": layer2, "layer3": layer3}


def test_preprocessing_maps_pixel_values_as_written():
    # A white image normalises to (1 - mean) / std per channel: 2.5, 2.4, 2.333...
    x = reference_input(torch.full((1, 3, 16, 16), 255, dtype=torch.uint8))
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([2.5, 2.4, 0.7 / 0.3]))


@pytest.mark.parametrize("size", [16, 12, 20])
def test_outputs_equal_the_hand_written_reference(engine, reference, size):
    batch = images(size=size)
    expected = reference_stages(reference, batch)
    got = engine.infer(batch, ["logits", "layer1", "layer2", "layer3"])
    assert list(got) == ["logits", "layer1", "layer2", "layer3"]
    for name, value in expected.items():
        assert got[name].shape == value.shape
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5)


def test_logits_equal_the_models_own_forward(engine, reference):
    batch = images(batch=2)
    with torch.inference_mode():
        expected = reference(reference_input(batch))
    torch.testing.assert_close(engine.infer(batch, ["logits"])["logits"], expected, rtol=1e-5, atol=1e-5)


def test_only_requested_outputs_are_returned_as_float32_cpu_contiguous(engine):
    got = engine.infer(images(), ["layer2"])
    assert list(got) == ["layer2"]
    assert got["layer2"].shape == (3, 32, 8, 8)
    assert got["layer2"].dtype == torch.float32 and got["layer2"].device.type == "cpu"
    assert got["layer2"].is_contiguous()


def test_duplicates_collapse_and_order_follows_the_request(engine):
    assert list(engine.infer(images(), ["layer3", "logits", "layer3"])) == ["layer3", "logits"]


def test_non_contiguous_input_is_accepted(engine, reference):
    batch = images(size=16).permute(0, 1, 3, 2)
    torch.testing.assert_close(
        engine.infer(batch, ["logits"])["logits"],
        reference_stages(reference, batch)["logits"],
        rtol=1e-5,
        atol=1e-5,
    )


def test_calls_counts_forward_passes(teacher_and_reference):
    engine = TeacherEngine(teacher_and_reference[0])
    assert engine.calls == 0
    engine.infer(images(), ["logits"])
    engine.infer(images(), ["layer1", "layer3"])
    assert engine.calls == 2
    with pytest.raises(InputSpecError):
        engine.infer(images().float(), ["logits"])
    assert engine.calls == 2


def test_spec_and_available_outputs(engine, teacher_and_reference):
    assert engine.spec is teacher_and_reference[0].spec
    assert engine.available_outputs == ["logits", "layer1", "layer2", "layer3"]


def test_feature_shapes_of_every_tap(engine):
    expected = {"layer1": (16, 16, 16), "layer2": (32, 8, 8), "layer3": (64, 4, 4)}
    assert engine.feature_shapes(16) == expected
    assert engine.feature_shapes((8, 12)) == expected  # other sizes are resized to the model's 16x16


@pytest.mark.parametrize(
    "bad, problem",
    [
        (images().float(), "got dtype torch.float32"),
        (images()[0], "got 3 dimensions"),
        (images(channels=1), "got 1 channels"),
        (images(batch=0), "got an empty batch"),
    ],
)
def test_input_spec_errors_state_the_expected_input(engine, bad, problem):
    with pytest.raises(InputSpecError) as info:
        engine.infer(bad, ["logits"])
    message = str(info.value)
    assert problem in message
    assert "uint8 images [B, C, H, W]" in message and "C=3" in message and "16x16" in message
    assert isinstance(info.value, ValueError)


def test_input_that_is_not_a_tensor(engine):
    with pytest.raises(InputSpecError, match="got a list"):
        engine.infer([[0]], ["logits"])


def test_unknown_output_lists_available_outputs(engine):
    expected = r"unknown outputs \['layer4'\]; available outputs: logits, layer1, layer2, layer3"
    with pytest.raises(UnknownOutputError, match=expected):
        engine.infer(images(), ["logits", "layer4"])


def test_empty_output_request_is_refused(engine):
    with pytest.raises(UnknownOutputError, match="no outputs requested; available outputs: logits"):
        engine.infer(images(), [])


def test_a_single_name_string_is_one_output(engine):
    assert list(engine.infer(images(), "layer1")) == ["layer1"]


def test_unknown_precision_is_refused(teacher_and_reference):
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, got 'fp16'"):
        TeacherEngine(teacher_and_reference[0], precision="fp16")


def test_bf16_on_cpu_stays_close_to_fp32(teacher_and_reference, reference):
    batch = images()
    bf16 = TeacherEngine(teacher_and_reference[0], precision="bf16").infer(batch, ["logits"])["logits"]
    assert bf16.dtype == torch.float32
    expected = reference_stages(reference, batch)["logits"]
    assert (bf16 - expected).abs().max() <= 0.05 * expected.abs().max()


def test_single_channel_teacher():
    gray = Preprocessing(16, (0.5,), (0.25,), in_chans=1)
    engine = TeacherEngine(create_teacher("cifar_resnet20", 2, preprocessing=gray))
    assert engine.infer(images(channels=1), ["logits"])["logits"].shape == (3, 2)


def test_outputs_can_be_saved_for_backward_by_a_training_loss():
    """Engine outputs leave inference mode: a loss may save a teacher map for backward (EKD's feature term,
    FEED's paraphraser), which inference tensors forbid."""
    torch.manual_seed(0)
    engine = TeacherEngine(create_teacher("cifar_resnet20", 10, preprocessing=Preprocessing.cifar(16)))
    outputs = engine.infer(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), ["logits", "layer3"])
    assert not any(t.is_inference() for t in outputs.values())
    adapter = torch.nn.Conv2d(64, 64, 1)
    loss = torch.nn.functional.mse_loss(adapter(outputs["layer3"]), outputs["layer3"]) + (
        adapter.weight.sum() * outputs["logits"].sum()
    )
    loss.backward()
    assert adapter.weight.grad is not None
